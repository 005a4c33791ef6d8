"""The cluster bootstrap of the pooled correlations: the vectorised resamples against the per-resample paths.

The table is the main job's shape on the stand-in (`sweeps/ablation.toml`, standin preset): 12 trajectories
(3 placements × 2 rates × 2 seeds) × 3 cells, 3 intrinsic × 4 transfer metrics, simulated with
`fakedet.analysis.simulate`; a validation AUC that some cells do not clear (`trained_threshold` 0.75)
gives the `pooled|trained` rows trajectories of 2 and 3 cells: unequal blocks, so resamples of unequal size.

Three ways to compute the bootstrap statistic of one resample batch (picks: B × k trajectory numbers),
all bit-identical (tests/test_statistics.py):

- `per-resample`: one `correlate` call per resample (~75,000 calls per table);
- `grouped`: each resample's rows concatenated in a Python loop (`Clusters.rows`), then the resamples of
  one size correlated together (`Clusters.many`);
- `vectorised`: every resample's rows laid out in one flat array without a Python loop over resamples,
  then the resamples of one size correlated together (`Clusters.correlations`, what `correlation_table` runs).

Each is timed over the 36 `pooled|trained` bootstrap intervals (`Clusters.ci`, n_boot 1000; 12 pairs ×
3 methods; the unequal blocks, where the paths differ) and over the 36 `pooled` ones (equal blocks: one
rectangle in every path), in this one process, interleaved (the order rotates every repeat), so that load
on a shared machine hits all alike; the whole `correlation_table` is timed with the vectorised path. Times
are the process's CPU seconds (`time.process_time`; the work is single-threaded numpy), which a loaded
machine inflates far less than it does wall time.
`per-resample` takes ~15× as long as the others (35 s a repeat on a loaded 2-core machine), so it runs
only when asked for.

    python benchmarks/bench_statistics.py [--repeats 5] [--n-boot 1000] [--per-resample]

Prints seconds per table for each path (median, min, max over repeats), the speed-ups of `vectorised`
over the others with their spread, the check that all three give the same intervals (==), and the load
average (`os.getloadavg`) before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pandas as pd

from fakedet.analysis import correlate, correlation_table
from fakedet.analysis.resampling import Clusters
from fakedet.analysis.simulate import Design, simulate_curves, to_tables

INTRINSIC = ["cifake_test/acc", "cifake_test/f1", "cifake_test/auc"]  # sweeps/ablation.toml [metrics]
TRANSFER = ["agiri_test/acc", "agiri_test/f1", "agiri_test/auc", "cifar100_test/real_recall"]
TRAINED = ("cifake_val/auc", 0.75)  # the study file's trained_metric and trained_threshold


def main_job_tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points, cells) of 12 simulated trajectories with every metric the main job's analysis reads."""
    design = Design()  # 3 placements × lr {1e-3, 1e-2} × 2 seeds
    rng = np.random.default_rng(seed)
    points = cells = None
    pairs = list(zip(INTRINSIC + INTRINSIC[:1], TRANSFER)) + [(TRAINED[0], "unused")]
    for x, y in pairs:
        sim = simulate_curves(rng, 1, design, trend="lr", transfer="rise_fall", rho=0.5)
        p, c = to_tables(sim, 0, design, x, y)
        if points is None:
            points, cells = p, c
        else:
            points[[x, y]], cells[[x, y]] = p[[x, y]], c[[x, y]]
    return points.drop(columns="unused"), cells.drop(columns="unused")


STATISTICS = {
    "per-resample": lambda d, picks, m: np.array([correlate(d.x[r], d.y[r], m) for r in d.rows(picks)]),
    "grouped": lambda d, picks, m: d.many(d.rows(picks), m),
    "vectorised": Clusters.correlations,
}


def bootstrap_intervals(frame: pd.DataFrame, how: str, n_boot: int) -> list[tuple]:
    """The 36 pooled intervals (12 pairs × 3 methods) over the cells of `frame`, the bootstrap statistic
    computed `how`; one seeded generator, as `correlation_table` draws them."""
    original = Clusters.correlations
    Clusters.correlations = STATISTICS[how]
    try:
        rng = np.random.default_rng(0)
        out = []
        for x in INTRINSIC:
            for y in TRANSFER:
                data = Clusters(frame, x, y, "cell_epochs")
                out += [data.ci(m, n_boot, rng, 0.95) for m in ("pearson", "spearman", "kendall")]
        return out
    finally:
        Clusters.correlations = original


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--per-resample", action="store_true", help="also time one correlate call per resample")
    args = parser.parse_args()
    points, cells = main_job_tables()
    kept = cells[cells[TRAINED[0]] >= TRAINED[1]]
    blocks = kept.groupby("trajectory").size()
    print(f"table: {cells['trajectory'].nunique()} trajectories × 3 cells, {len(INTRINSIC)} × {len(TRANSFER)} metric "
          f"pairs; pooled|trained blocks of {sorted(blocks.unique().tolist())} cells; n_boot {args.n_boot}")
    load_before = os.getloadavg()
    names = [how for how in STATISTICS if args.per_resample or how != "per-resample"]
    frames = {"pooled|trained (unequal blocks)": kept, "pooled (equal blocks)": cells}
    times = {(f, how): [] for f in frames for how in names}
    results: dict[tuple, list[tuple]] = {}
    for repeat in range(args.repeats):
        for how in names[repeat % len(names):] + names[: repeat % len(names)]:  # rotated: no side always first
            for f, frame in frames.items():
                start = time.process_time()
                results[f, how] = bootstrap_intervals(frame, how, args.n_boot)
                times[f, how].append(time.process_time() - start)
    table_s = []
    for _ in range(args.repeats):
        start = time.process_time()
        correlation_table(cells, points, INTRINSIC, TRANSFER, n_boot=args.n_boot, trained_threshold=TRAINED[1],
                          trained_metric=TRAINED[0])  # fmt: skip
        table_s.append(time.process_time() - start)
    load_after = os.getloadavg()
    same = all(results[f, how] == results[f, "vectorised"] for f in frames for how in names)
    for f in frames:
        print(f"{f}, 36 intervals, CPU seconds (median, min, max over {args.repeats} repeats):")
        for how in names:
            print(f"  {how:>13}: {spread(times[f, how], '{:.2f}')} s")
        for how in names[:-1]:
            ratios = [a / b for a, b in zip(times[f, how], times[f, "vectorised"])]
            print(f"  vectorised over {how}: {spread(ratios, '{:.2f}×')} (ratio per repeat, n = {args.repeats})")
    print(f"whole correlation_table (vectorised): {spread(table_s, '{:.2f}')} CPU s")
    print(f"intervals identical (==) across the paths: {same}")
    print(f"load average (1, 5, 15 min) before: {', '.join(f'{v:.1f}' for v in load_before)}; "
          f"after: {', '.join(f'{v:.1f}' for v in load_after)}; {os.cpu_count()} CPUs")
    if not same:
        raise SystemExit("the three paths gave different intervals")


if __name__ == "__main__":
    main()
