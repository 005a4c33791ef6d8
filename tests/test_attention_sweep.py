"""The attention and augmentation axes in sweeps: grids without duplicate models, cells that name and log
the new fields, keys of the study's own cells unchanged, and older sweeps read back as the study's."""

import hashlib
import json

from mlflow.tracking import MlflowClient

from fakedet.config import TrainConfig
from fakedet.results import points_from_mlflow
from fakedet.sweep.spec import CELL_PARAMS, LATER_FIELDS, RUNTIME_FIELDS, Cell
from fakedet.sweep.study import Study
from fakedet.sweep.tags import TAG_KIND, TAG_PARENT, TAG_TRAJECTORY


def test_the_study_cells_keep_their_names_and_keys_from_before_the_axes():
    cell = Cell(TrainConfig(srm="pool1", epochs=10, lr=1e-2, seed=12))
    # the key as it was computed before these fields existed: every field but the runtime ones
    before = {k: v for k, v in cell.config.to_dict().items() if k not in RUNTIME_FIELDS and k not in LATER_FIELDS}
    before["epochs"] = 10.0
    assert cell.key == hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert cell.name == "srm=pool1 ep=10 lr=0.01 seed=12"
    assert {"attention", "augment", "augment_p", "augment_sigma", "augment_quality"} <= set(CELL_PARAMS)
    assert cell.params()["attention"] == "srm" and cell.params()["augment"] == "none"


def test_varied_cells_name_their_module_and_augmentation_and_differ_in_key():
    se = Cell(TrainConfig(srm="pool1", attention="se", epochs=10))
    augmented = Cell(TrainConfig(augment="blur_jpeg", augment_p=0.1, epochs=10))
    assert se.name == "srm=pool1 att=se ep=10 lr=0.001 seed=11"
    assert augmented.name == "srm=none aug=blur_jpeg p=0.1 ep=10 lr=0.001 seed=11"
    sharper = Cell(TrainConfig(augment="blur_jpeg", augment_p=0.1, augment_sigma=(0.0, 1.5), epochs=10))
    assert len({Cell(TrainConfig(epochs=10)).key, se.key, augmented.key, sharper.key}) == 4


def test_grids_train_each_distinct_model_once():
    attention = Study.load("attention")
    trajectories = attention.trajectories()
    # 4 modules x 3 placements with a module, plus the base model once, x 3 seeds
    assert len(trajectories) == (4 * 3 + 1) * 3
    assert len({t.label for t in trajectories}) == len(trajectories)
    assert {t.config.attention for t in trajectories if t.config.srm == "none"} == {"srm"}
    augment = Study.load("augment").trajectories()
    assert len(augment) == (1 + 2) * 3  # none once, blur_jpeg at p 0.1 and 0.5
    assert {t.config.augment_p for t in augment if t.config.augment == "none"} == {TrainConfig.augment_p}
    # the study's own grid: what it was, cell for cell
    ablation = Study.load("ablation").trajectories()
    assert all(t.config.attention == "srm" and t.config.augment == "none" for t in ablation) and len(ablation) == 27


def test_an_older_sweep_without_the_new_params_reads_back_as_the_study(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("old")
    parent = client.create_run(experiment).info.run_id
    for params in ({"srm": "pool1", "lr": "0.01", "seed": "11", "epochs": "2"},  # recorded before the axes
                   {"srm": "pool1", "lr": "0.01", "seed": "11", "epochs": "2", "attention": "cbam", "augment": "blur_jpeg",
                    "augment_p": "0.1"}):
        run = client.create_run(experiment, tags={TAG_KIND: "cell", TAG_PARENT: parent,
                                                   TAG_TRAJECTORY: json.dumps(params)}).info.run_id
        for key, value in params.items():
            client.log_param(run, key, value)
        client.log_metric(run, "agiri_test/auc", 0.7, step=1)
        client.set_terminated(run)
    points, cells = points_from_mlflow(client, experiment, parent)
    old, new = sorted(cells.to_dict("records"), key=lambda r: r["attention"] == "cbam")
    assert (old["attention"], old["augment"], old["augment_p"]) == ("srm", "none", 0.5)
    assert (new["attention"], new["augment"], new["augment_p"]) == ("cbam", "blur_jpeg", 0.1)
    assert set(points["attention"]) == {"srm", "cbam"}
