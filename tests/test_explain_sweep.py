"""The maps in a sweep, read from the session's one smoke ablation (`sweeps/run.py ablation --smoke`, the
`smoke_sweep` fixture the sweep tests share): every cell has its `explain/` artifacts and its shares at every
evaluation point, and the parent run has the explain view."""

from __future__ import annotations

import io

import numpy as np

from fakedet.explain import PROBE_PER_CLASS
from fakedet.sweep.trainable import SWEEP_EVAL_SETS


def test_every_smoke_cell_has_maps_and_shares(workspace, smoke_sweep):
    c, parent, children = workspace.runs("smoke1")
    assert len(children) == 12
    probe_images = None
    for run in children:
        files = {a.path for a in c.list_artifacts(run.info.run_id, "explain")}
        assert files == {f"explain/{s}.{ext}" for s in SWEEP_EVAL_SETS for ext in ("npz", "png")}, run.info.run_name
        m = run.data.metrics
        for cls in ("real", "fake"):
            assert 0 <= m[f"cifake_test/cam_bg_share_{cls}"] <= 1 or np.isnan(m[f"cifake_test/cam_bg_share_{cls}"])
        assert 0 < m["cifake_test/cam_bg_area"] < 1 and "agiri_test/cam_entropy" in m and "agiri_test/cam_bg_share" not in m
        # logged at every evaluation point, as any metric: the 0.5-epoch point, then each epoch
        assert len(c.get_metric_history(run.info.run_id, "cifake_val/cam_bg_share")) == len(c.get_metric_history(run.info.run_id, "cifake_val/auc"))
        path = c.download_artifacts(run.info.run_id, "explain/cifake_test.npz")
        with np.load(path) as z:
            assert z["cam/last_conv"].shape == (2 * PROBE_PER_CLASS, 32, 32) and z["masks"].shape == (2 * PROBE_PER_CLASS, 32, 32)
            assert ("gate/attend/channel" in z.files) == (run.data.params["srm"] == "pool1")
            if probe_images is None:
                probe_images = z["images"]
            assert np.array_equal(z["images"], probe_images)  # the same probe images in every cell
    figures = {a.path for a in c.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/explain_cifake_test.png" in figures and "figures/errors.txt" not in figures
    png = c.download_artifacts(parent.info.run_id, "figures/explain_cifake_test.png")
    from PIL import Image

    assert Image.open(io.BytesIO(open(png, "rb").read())).size[0] > 600
