"""What the maps (`fakedet.explain`) add to one trajectory of the main job: CPU seconds per evaluation point
(the shares on every probe set) and per cell (its `explain/` maps), against the trajectory's training.

It trains one trajectory of the main job's grid (`sweeps/ablation.toml`, preset `standin`: pool1, lr 1e-2,
its evaluation points) to --epochs on the default planted stand-in, as `fakedet.sweep.trainable` does at
each point: one pass over the probe sets, and the maps where a cell of 1 or --epochs epochs ends.

    python benchmarks/bench_explain.py [--epochs 10]   # about 40 CPU-s on 2 cores

Prints the CPU seconds of the whole trajectory, of a point's shares and of a cell's maps, and the maps'
share of the trajectory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fakedet.data import resolve_data, load_splits  # noqa: E402
from fakedet.explain import explain_probes, probe_sets, probe_shares, trained_model, write_maps  # noqa: E402
from fakedet.sweep.study import Study  # noqa: E402
from fakedet.sweep.trainable import SWEEP_EVAL_SETS  # noqa: E402
from fakedet.train import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--cache-root", default=str(Path(tempfile.gettempdir()) / "fakedet-bench-explain"))
    args = ap.parse_args()
    study = Study.load(Path(__file__).resolve().parents[1] / "sweeps" / "ablation.toml", preset_if_present="standin")
    trajectory = next(t for t in study.trajectories() if t.config.srm == "pool1" and t.config.lr == 1e-2)
    cfg = replace(trajectory.config, epochs=args.epochs, eval_at=tuple(e for e in trajectory.config.eval_at if e <= args.epochs))
    sets = load_splits(resolve_data("synthetic", args.cache_root, size="default", variant="planted", show_progress=False))
    eval_sets = {k: sets[k] for k in SWEEP_EVAL_SETS if k in sets}
    probes = probe_sets(eval_sets)
    point, cell = [0.0, 0], [0.0, 0]

    def on_eval(record, snapshot):
        t = time.process_time()
        explained = explain_probes(trained_model(cfg, snapshot()["model"]), probes)
        probe_shares(explained, probes)
        point[0] += time.process_time() - t
        point[1] += 1
        if record.epoch in (1.0, float(args.epochs)):
            with tempfile.TemporaryDirectory() as d:
                t = time.process_time()
                write_maps(Path(d), probes, explained)
                cell[0] += time.process_time() - t
                cell[1] += 1

    t = time.process_time()
    train(cfg, sets["cifake_train"], eval_sets, on_eval=on_eval)
    total = time.process_time() - t
    print(f"pool1 lr 1e-2 to {args.epochs} epochs: {total:.1f} CPU-s in all; {point[1]} points' shares at {point[0] / point[1]:.3f} s; "
          f"{cell[1]} cells' maps at {cell[0] / max(cell[1], 1):.3f} s; the maps {(point[0] + cell[0]) / total:.2%} of the trajectory")


if __name__ == "__main__":
    main()
