#!/usr/bin/env bash
# The GPU checks in one go, within 9 minutes on one GPU (each step has a time limit; $BUDGET bounds the whole):
#   1. env       what is there: torch, CUDA, the GPU, ray/mlflow/optuna
#   2. tests     python -m pytest -m gpu tests/test_gpu.py (CPU agreement, checkpoints GPU->CPU->GPU, the
#                reference checkpoints and `fakedet predict` on the GPU, resume and prefix sharing, no host
#                synchronisation in the steps, CUDA-graph steps against eager ones, a CIFAKE-scale trial's device
#                memory, four Ray trials on one GPU)
#   3. ablation  python sweeps/run.py ablation --smoke --seeds 2 --bundle 1 --gpus-per-trial 0.25: four trials, one GPU
#   4. bench     one model at batch 32: fakedet's loop against the reference-style loop
#   5. bench_det the same in the deterministic mode (its cost)
#   6. bench_4   four concurrent trials on one device at CIFAKE scale (90,000 images): images/s and
#                torch.cuda.max_memory_allocated per trial
#   7. bundle    benchmarks/bench_bundle.py: K = 1, 4, 16 models in one process (one fused step)
#                against K separate processes of train(), images/s summed over models
#   8. ablation_bundle  the smoke ablation with --seeds 2 --bundle 2: half the trials, the same cells
#   9. graph     benchmarks/bench_steppers.py --what graph: each stepper eager against fakedet.train.GraphStepper
#                (the step replayed from a CUDA graph), one model and the vmap and wide bundles at K = 4, 16, 64
#                (dry run: the line saying graphs need CUDA)
#  10. bundle_ks benchmarks/bench_steppers.py --what bundle on the device: K models one after another against the
#                vmap and the wide bundle, K = 1, 2, 4, 8, 16, 32, 64
#  11. ablation_cifake  the study's whole ablation grid (3 placements x 4 lengths x 3 rates x 3 seeds: 27
#                trajectories to 100 epochs) on the built-in stand-in at CIFAKE scale (90,000 training images),
#                for what is left of $BUDGET: it cannot finish in one slot; the summary gives the trials
#                started and finished, the training steps per second summed over trials and the projected
#                time of the whole grid. Its data are generated in the background from the start.
# then prints a summary to paste into the README (also written to summary.md).
#
#   benchmarks/gpu_check.sh              on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run    the same steps on the CPU at tiny sizes (DEVICE=cpu does the same):
#                                        the tests run on the CPU, Ray is told of one (absent) GPU
#
# Outputs go to $OUT if set, else to a new folder under /tmp: gpu_check.log (every step's full output),
# the figures as JSON (gpu_tests.json, bench_one.json, bench_det.json, bench_four.json, graph.json,
# bundle_ks.json, ablation_cifake.json) and summary.md.
# The sweep's data cache, Ray and MLflow stores go to a temp folder of their own, removed at the end.
# Each step has a time limit; the whole run stops starting steps after $BUDGET seconds (default 540 on
# a GPU, so that it ends within a 10-minute slot). A failed step does not stop the others; the exit
# status is 1 if any step failed (ablation_cifake stopping at its limit is its plan, not a failure).
#
# Environment: PYTHON (default: python3), FAKEDET_REFERENCE_DIR (the study's checkpoints; default
# ../shared/reference beside the repository), BUDGET, OUT, DEVICE.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
for arg in "$@"; do
    case $arg in
        --dry-run) DEVICE=cpu ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
if [[ $DEVICE == cpu ]]; then DRY=1; else DRY=0; fi

if [[ $DRY == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: $PY sees no CUDA device; on a machine without one run: benchmarks/gpu_check.sh --dry-run" >&2
    exit 2
fi

OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
# a reused $OUT must not lend this run an earlier run's figures: the summary reads these files
rm -f "$OUT"/{gpu_tests,bench_one,bench_det,bench_four,graph,bundle_ks,ablation_cifake}.json "$OUT/summary.md"
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
# Ray's socket paths must stay short: its temp dir goes under /tmp directly
RAY_TMP=$(mktemp -d /tmp/fdgc.XXXXXX)
trap '{ kill "${CIFAKE_DATA_PID:-}" 2>/dev/null || true; }; rm -rf "$WORK" "$RAY_TMP"' EXIT  # set -e holds in the trap
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -z ${FAKEDET_REFERENCE_DIR:-} && -d $REPO/../shared/reference ]]; then
    export FAKEDET_REFERENCE_DIR=$REPO/../shared/reference
fi

if [[ $DRY == 1 ]]; then
    # sizes for 2 shared CPU cores: the same steps, smaller
    BUDGET=${BUDGET:-3600}
    T_ENV=60; T_TESTS=1500; T_ABLATION=1200; T_ABLATION_BUNDLE=1200; T_BENCH=300; T_BENCH4=600; T_BUNDLE=600
    T_GRAPH=120; T_BUNDLE_KS=300; T_CIFAKE=1200
    BENCH_BUNDLE=(--n-images 2000 --steps 20 --ks 1,4 --threads 1)
    BENCH_ONE=(--images 2000 --epochs 1 --repeats 1)
    BENCH_FOUR=(--images 4000 --epochs 0.5)
    BENCH_GRAPH=(--ks 1,4 --srm none --steps 5 --repeats 1)
    BENCH_KS=(--ks 1,2 --srm none --steps 5 --repeats 1)
    # ablation_cifake: the whole grid's shape (3 placements x 4 lengths x 3 rates x 3 seeds) on the small
    # stand-in (the smoke preset's), at 1 to 4 epochs
    CIFAKE_SIZE=small; CIFAKE_EPOCHS="[1, 2, 3, 4]"
    RAY_CPUS=4
    # Ray schedules `--gpus-per-trial 0.25` only where it counts a GPU: declare one (the trials train on the CPU)
    ABLATION_ENV=(RAY_OVERRIDE_RESOURCES='{"GPU": 1}')
else
    BUDGET=${BUDGET:-540}
    # The limits of the steps before ablation_cifake add up to 460 s, so each gets its whole limit within the
    # 540 s budget and ablation_cifake at least 80 s. To make room for graph, bundle_ks and ablation_cifake the
    # earlier steps' limits (980 s together, none yet tried on a GPU) were cut: env 60 -> 20 (imports
    # only); tests 200 -> 150 (the first check of every CUDA path: the last to cut; 155 s on the CPU dry run,
    # where the GPU-only tests skip); the two smoke ablations
    # 180 -> 45 and 35 (four and two trials of 2 epochs on 1,800 images; the small stand-in is generated once,
    # in the first); bench 75 -> 25 each (3 x 625 steps per side); bench_4 90 -> 35 (703 steps per trial);
    # bundle 120 -> 30 with K up to 16 and 100 steps per model, not 64 and 200 (the separate processes'
    # start-up dominates; bundle_ks covers K = 32 and 64 in one process).
    T_ENV=20; T_TESTS=150; T_ABLATION=45; T_ABLATION_BUNDLE=35; T_BENCH=25; T_BENCH4=35; T_BUNDLE=30
    T_GRAPH=45; T_BUNDLE_KS=50; T_CIFAKE=$BUDGET
    BENCH_BUNDLE=(--n-images 90000 --steps 100 --ks 1,4,16)  # CIFAKE scale; 100 steps per model
    BENCH_ONE=(--images 20000 --epochs 1 --repeats 3)
    BENCH_FOUR=(--images 90000 --epochs 0.25)  # CIFAKE's training split; a quarter epoch is 703 steps per trial
    # 100 timed steps per side after 10 untimed (the capture among them), 3 repeats: about 5 s a repeat at
    # K = 64 if a vmap step takes 15 ms eagerly (unmeasured: the limit allows three times the estimate's sum)
    BENCH_GRAPH=(--ks 1,4,16,64 --srm none --steps 100 --repeats 3)
    # 50 steps: the side of K models one after another runs 1 + 2 + ... + 64 = 127 models per repeat
    BENCH_KS=(--ks 1,2,4,8,16,32,64 --srm none --steps 50 --repeats 3)
    CIFAKE_SIZE=cifake; CIFAKE_EPOCHS="[1, 10, 50, 100]"
    RAY_CPUS=8
    ABLATION_ENV=()
fi
# ablation_cifake's grid: the study's (sweeps/ablation.toml's [space]) with its stand-in size, written as a study
# file of its own (sweeps/ablation.toml's `standin` preset, which --data synthetic applies, shrinks the grid).
# With the step captured into a CUDA graph (TrainConfig.cuda_graph; no effect on the CPU);
# CIFAKE_GRAPH=0 leaves it off.
CIFAKE_TRAJECTORIES=27  # 3 placements x 3 rates x 3 seeds; the 4 lengths are points on each trajectory
CIFAKE_STUDY=$WORK/ablation_cifake.toml
{
    echo 'kind = "ablation"'
    echo '[space]'
    echo 'srm = ["none", "pool1", "pool2"]'
    echo "epochs = $CIFAKE_EPOCHS"
    echo 'lr = [1e-4, 1e-3, 1e-2]'
    echo 'seeds = 3'
    echo '[data]'
    echo "size = \"$CIFAKE_SIZE\""
    if [[ ${CIFAKE_GRAPH:-1} == 1 ]]; then
        echo '[fixed]'
        echo 'cuda_graph = true'
    fi
} >"$CIFAKE_STUDY"

START=$(date +%s)
STEPS=()  # name|status|seconds

# ablation_cifake's stand-in, generated and prepared in the background from the start, into the cache its sweep
# reads (the sweep waits on the cache's lock if it is not done). On this project's 2-core CPU the `cifake` size
# took 5 min 36 s to generate (one process renders the 50,000 training fakes at 128 px: 4 min 54 s of CPU) and
# 26 s to prepare; more cores do not shorten that one job, so it runs beside the other steps, pinned to the
# upper half of the CPUs where taskset exists, so that the benchmarks' processes keep the rest.
PIN=()
if command -v taskset >/dev/null && (($(nproc) >= 4)); then PIN=(taskset -c "$(($(nproc) / 2))-$(($(nproc) - 1))"); fi
"${PIN[@]}" "$PY" -c 'import sys, time
from fakedet.data.resolve import resolve_data
resolve_data("synthetic", sys.argv[1], size=sys.argv[2], show_progress=False)
print(f"{time.time() - float(sys.argv[3]):.0f}")' "$WORK/cache" "$CIFAKE_SIZE" "$START" >"$WORK/cifake_data.txt" 2>"$WORK/cifake_data.log" &
CIFAKE_DATA_PID=$!

# run_step NAME LIMIT COMMAND...: runs with a time limit (cut to what is left of $BUDGET), appends the
# output to $LOG, prints its tail, records status and seconds; never stops the script. With STOP_AT_LIMIT=1
# reaching the limit is the step's plan: its status stays ok.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 15)); then
        echo "== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$LOG"
        STEPS+=("$name|skipped (no time left)|0")
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0 rc=0 secs
    t0=$(date +%s.%N)
    timeout --kill-after=15 "$limit" "$@" >"$WORK/step.log" 2>&1 || rc=$?
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    cat "$WORK/step.log" >>"$LOG"
    tail -n 15 "$WORK/step.log"
    local status=ok
    if ((rc == 124 || rc == 137)) && [[ ${STOP_AT_LIMIT:-0} == 1 ]]; then
        status="ok (stopped at its ${limit}s limit, as planned)"
    elif ((rc == 124 || rc == 137)); then status="timed out after ${limit}s"; elif ((rc != 0)); then status="failed (exit $rc)"; fi
    echo "== $name: $status in ${secs}s" | tee -a "$LOG"
    STEPS+=("$name|$status|$secs")
    return 0
}

run_step env "$T_ENV" "$PY" - "$DEVICE" <<'EOF'
import importlib, os, platform, sys
import torch
device = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPUs")
if device != "cpu":
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")
missing = []
for name in ("ray", "mlflow", "optuna", "sklearn", "scipy", "pandas", "PIL", "psutil", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError:
        missing.append(name)
if missing:
    sys.exit(f"missing: {', '.join(missing)} (carry them as wheels; the sweep and the Ray test need ray, mlflow, optuna)")
EOF

run_step tests "$T_TESTS" env FAKEDET_GPU_TEST_DEVICE="$DEVICE" FAKEDET_GPU_REPORT="$OUT/gpu_tests.json" \
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --basetemp="$WORK/pytest" tests/test_gpu.py

run_step ablation "$T_ABLATION" env "${ABLATION_ENV[@]}" "$PY" sweeps/run.py ablation --smoke --seeds 2 --bundle 1 \
    --gpus-per-trial 0.25 --num-cpus "$RAY_CPUS" --name gpucheck --cache-root "$WORK/cache" \
    --storage-path "$WORK/ray_results" --tracking-uri "sqlite:///$WORK/mlflow.db" --ray-temp-dir "$RAY_TMP"
# how many of the sweep's trials ran at once, from their reports' clocks (Ray Tune's result.json per trial)
"$PY" - "$WORK/ray_results/gpucheck" >"$WORK/ablation.json" 2>>"$LOG" <<'EOF' || echo '{}' >"$WORK/ablation.json"
import json, sys
from pathlib import Path
spans = []
for f in Path(sys.argv[1]).glob("*/result.json"):
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if rows:
        spans.append((rows[0]["timestamp"] - rows[0].get("time_this_iter_s", 0), rows[-1]["timestamp"]))
at_once = max((sum(a <= t < b for a, b in spans) for t, _ in spans), default=0)
print(json.dumps({"trials": len(spans), "max_at_once": at_once}))
EOF

run_step bench "$T_BENCH" "$PY" benchmarks/bench_train.py --device "$DEVICE" "${BENCH_ONE[@]}" --json "$OUT/bench_one.json"
run_step bench_det "$T_BENCH" "$PY" benchmarks/bench_train.py --device "$DEVICE" "${BENCH_ONE[@]}" --deterministic \
    --no-reference --json "$OUT/bench_det.json"
run_step bench_4 "$T_BENCH4" "$PY" benchmarks/bench_train.py --device "$DEVICE" "${BENCH_FOUR[@]}" --concurrent 4 \
    --json "$OUT/bench_four.json"

run_step bundle "$T_BUNDLE" "$PY" benchmarks/bench_bundle.py --device "$DEVICE" "${BENCH_BUNDLE[@]}"
grep -h '^ratios (bundle / separate)' "$WORK/step.log" >"$WORK/bundle.txt" || true
run_step ablation_bundle "$T_ABLATION_BUNDLE" env "${ABLATION_ENV[@]}" "$PY" sweeps/run.py ablation --smoke --seeds 2 --bundle 2 \
    --gpus-per-trial 0.25 --num-cpus "$RAY_CPUS" --name gpucheck-bundle --cache-root "$WORK/cache" \
    --storage-path "$WORK/ray_results" --tracking-uri "sqlite:///$WORK/mlflow.db" --ray-temp-dir "$RAY_TMP"

run_step graph "$T_GRAPH" "$PY" benchmarks/bench_steppers.py --what graph --device "$DEVICE" "${BENCH_GRAPH[@]}" \
    --json "$OUT/graph.json"
run_step bundle_ks "$T_BUNDLE_KS" "$PY" benchmarks/bench_steppers.py --what bundle --device "$DEVICE" "${BENCH_KS[@]}" \
    --json "$OUT/bundle_ks.json"

# the whole grid for what is left of the budget: 3 trials (one per placement, its 9 trajectories bundled: `auto`
# on GPUs), a third of the GPU each so that all three run at once
STOP_AT_LIMIT=1 run_step ablation_cifake "$T_CIFAKE" env "${ABLATION_ENV[@]}" "$PY" sweeps/run.py ablation --study "$CIFAKE_STUDY" \
    --data synthetic --gpus-per-trial 0.33 --num-cpus "$RAY_CPUS" --name gpucheck-cifake --cache-root "$WORK/cache" \
    --storage-path "$WORK/ray_results" --tracking-uri "sqlite:///$WORK/mlflow.db" --ray-temp-dir "$RAY_TMP"
# what it reached, from Ray Tune's result.json per trial (one row per evaluation point of each trajectory)
if ! "$PY" - "$WORK/ray_results/gpucheck-cifake" "$CIFAKE_TRAJECTORIES" "$WORK/cifake_data.txt" "$CIFAKE_STUDY" "$CIFAKE_SIZE" \
        >"$OUT/ablation_cifake.json" 2>>"$LOG" <<'EOF'
import json, sys
from pathlib import Path

root, planned, ready, study, size = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
trials = []
for f in sorted(root.glob("*/result.json")):
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if rows:
        trials.append(rows)
steps_done, finished, total_steps, rates, spans = 0, 0, 0, [], []
for rows in trials:
    by_trajectory: dict[int, list[dict]] = {}
    for r in rows:
        by_trajectory.setdefault(r["trajectory"], []).append(r)
    total_steps = rows[0]["total_steps"]  # every trajectory trains to the grid's longest length
    reached = [max(r["step"] for r in rs) for rs in by_trajectory.values()]
    steps_done += sum(reached)
    finished += all(s == total_steps for s in reached)
    # the trial's own clock (time_total_s: seconds since it started), from its first report to its last
    t = [r["time_total_s"] for r in rows]
    moved = sum(max(r["step"] for r in rs) - min(r["step"] for r in rs) for rs in by_trajectory.values())
    if max(t) > min(t):
        rates.append(moved / (max(t) - min(t)))
    spans.append((rows[0]["timestamp"] - rows[0].get("time_this_iter_s", 0), rows[-1]["timestamp"]))
at_once = max((sum(a <= t < b for a, b in spans) for t, _ in spans), default=0)
rate = sum(rates)  # model-steps/s summed over the trials, which ran at once (max_at_once says how many)
grid = planned * total_steps
print(json.dumps({
    "trials_started": len(trials), "trials_finished": finished, "max_at_once": at_once, "trajectories": planned,
    "trajectories_started": sum(len({r["trajectory"] for r in rows}) for rows in trials),
    "model_steps_done": steps_done, "model_steps_grid": grid, "model_steps_per_s": rate, "images_per_s": rate * 32,
    "projected_grid_s": grid / rate if rate else None,
    "data_ready_s": float(ready.read_text()) if ready.is_file() and ready.read_text().strip() else None,
    "cuda_graph": "cuda_graph = true" in study.read_text(), "size": size,
}))
sys.exit(0 if trials else 1)
EOF
then
    STEPS[-1]="ablation_cifake|failed (no trial reported a result)|${STEPS[-1]##*|}"
fi
{ echo "== ablation_cifake's data, generated in the background:"; cat "$WORK/cifake_data.log"; } >>"$LOG" 2>/dev/null || true

printf '%s\n' "${STEPS[@]}" >"$WORK/steps.txt"
"$PY" - "$OUT" "$WORK" "$DRY" "$(($(date +%s) - START))" >"$OUT/summary.md" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, work, dry, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


tests, one, det, four = (load(out / f) for f in ("gpu_tests.json", "bench_one.json", "bench_det.json", "bench_four.json"))
ablation = load(work / "ablation.json")
m = tests.get("measured", {})
name = one.get("device_name") or tests.get("device_name") or "?"
mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
lines = [f"### GPU check{' (DRY RUN on the CPU: no GPU figures)' if dry else ''}: {name}, torch {one.get('torch') or tests.get('torch', '?')}, {total} s", "",
         "| step | result | seconds |", "| --- | --- | --- |"]
lines += [f"| {s.split('|')[0]} | {s.split('|')[1]} | {s.split('|')[2]} |" for s in (work / "steps.txt").read_text().split("\n") if s]
lines.append("")
if m:
    for mode in ("fast", "deterministic"):
        c = m.get(f"cpu_vs_device_{mode}")
        if c:
            lines.append(f"- train() on the device vs the CPU, {mode} mode, same init and batches (32 steps): max |Δ| of losses/AUC "
                         f"{c['loss_auc']:.2g} (tolerance {tests['loss_tol']:g}), of logits {c['logit']:.2g} (tolerance {tests['logit_tol']:g})")
    for mode in ("fast", "deterministic"):
        if f"resume_{mode}" in m:
            lines.append(f"- resume / prefix sharing on the device, {mode} mode: max |Δ| of losses/AUC {m[f'resume_{mode}']:.2g} / "
                         f"{m[f'prefix_{mode}']:.2g} (0 = bit-exact)")
    ref = {k.removeprefix("reference_"): v for k, v in m.items() if k.startswith("reference_")}
    if ref:
        lines.append("- reference checkpoints on the device vs the reference code on the CPU: max |Δ p_real| "
                     + ", ".join(f"{k} {v:.2g}" for k, v in ref.items()) + " (tolerance 1e-5)")
    if "cifake_scale_peak_bytes" in m:
        lines.append(f"- a CIFAKE-scale trial (90,000 training + 10,000 evaluation images): peak device memory "
                     f"{mib(m['cifake_scale_peak_bytes'])} (torch.cuda.max_memory_allocated; its data as uint8: {mib(m['cifake_scale_resident_bytes'])})")
    if "ray_fractional" in m:
        r = m["ray_fractional"]
        lines.append(f"- four Ray trials at 0.25 GPU ran at once on CUDA_VISIBLE_DEVICES={','.join(r['visible'])}")
if ablation:
    lines.append(f"- smoke ablation, --gpus-per-trial 0.25: {ablation.get('trials')} trials, at most {ablation.get('max_at_once')} at once")
if one:
    s = f"- one model, batch 32, {one['images']} images: fakedet {med(one['fakedet_loop']):.0f} images/s"
    if one.get("reference_loop"):
        s += f", reference-style loop {med(one['reference_loop']):.0f} images/s (ratio {med(one['ratio']):.2f})"
    if one.get("fakedet_max_memory_allocated"):
        s += f"; device memory {mib(max(one['fakedet_max_memory_allocated']))}"
    lines.append(s + f" (median of {one['repeats']})")
if det:
    lines.append(f"- the same in the deterministic mode: {med(det['fakedet_loop']):.0f} images/s")
if four:
    per = [t["loop_images_per_s"] for t in four["trials"]]
    lines.append(f"- four concurrent trials on one device, {four['images']} images each: {four['images_per_s_total']:.0f} images/s together "
                 f"({min(per):.0f}–{max(per):.0f} per trial); memory per trial at most {mib(max(t['memory_bytes'] for t in four['trials']))} "
                 f"({four['trials'][0]['memory_kind']})")
bundle = (work / "bundle.txt").read_text().strip() if (work / "bundle.txt").is_file() else ""
if bundle:
    lines.append(f"- bundled training (bench_bundle.py), {bundle}")
bundled = sorted((work / "ray_results" / "gpucheck-bundle").glob("trial_*")) if (work / "ray_results").is_dir() else []
if bundled:
    lines.append(f"- smoke ablation --seeds 2 --bundle 2: {len(bundled)} trials for 8 cells (4 trajectories)")
graph, ks, cifake = (load(out / f) for f in ("graph.json", "bundle_ks.json", "ablation_cifake.json"))
span = lambda xs: f"{med(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"  # noqa: E731
if graph.get("graph_skipped"):
    lines.append(f"- CUDA graphs (bench_steppers.py --what graph): not measured ({graph['graph_skipped']})")
for row in graph.get("rows", []):
    r, rate, k = row["ratios"], row["rates"], row["k"]
    if k == 1:
        lines.append(f"- CUDA graph against eager steps, one model (ModuleStepper), srm {row['srm']}: {med(rate['one_eager']):.0f} → "
                     f"{med(rate['one_graph']):.0f} images/s, graph / eager {span(r['one_graph/one_eager'])} (median (min–max) of {graph['repeats']}; "
                     f"{row['counters']['one_graph']['replayed']} of the last run's steps replayed)")
        continue
    forms = "; ".join(f"{f} {med(rate[f + '_eager']):.0f} → {med(rate[f + '_graph']):.0f} images/s, graph / eager {span(r[f'{f}_graph/{f}_eager'])} "
                      f"({row['counters'][f + '_graph']['replayed']} steps replayed), "
                      f"against {k} separate ModuleSteppers {span(r[f'{f}_eager/one_eager'])} eager, {span(r[f'{f}_graph/one_graph'])} graphed"
                      for f in ("vmap", "wide"))
    lines.append(f"- CUDA graph, K = {k}, srm {row['srm']}: {forms}")
if ks.get("rows"):
    lines.append(f"- bundles on the {ks['device']} (bench_steppers.py --what bundle, {ks['steps']} steps, images/s summed over models, "
                 f"median of {ks['repeats']}; K models one after another | vmap | wide): "
                 + ", ".join(f"K={row['k']}: {med(row['rates']['alone']):.0f} | {med(row['rates']['vmap']):.0f} | {med(row['rates']['wide']):.0f}"
                             for row in ks["rows"]))
if cifake:
    c = cifake
    scale = " (90,000 training images)" if c["size"] == "cifake" else ""
    s = (f"- the whole ablation grid ({c['trajectories']} trajectories, 36 cells x 3 seeds) on the `{c['size']}` stand-in{scale}, "
         f"--gpus-per-trial 0.33{', CUDA graphs on' if c['cuda_graph'] else ''}: {c['trials_started']} trials started "
         f"({c['trajectories_started']} trajectories, at most {c['max_at_once']} trials at once), {c['trials_finished']} finished; "
         f"{c['model_steps_done']:,} of {c['model_steps_grid']:,} model-steps"
         + (f" ({100 * c['model_steps_done'] / c['model_steps_grid']:.1f}%)" if c["model_steps_grid"] else ""))
    if c["model_steps_per_s"]:
        s += (f"; {c['images_per_s']:.0f} training images/s summed over trials (each from its first report to its last, "
              f"evaluation included; the first epoch has the densest evaluation points): the whole grid in about "
              f"{c['projected_grid_s'] / 60:.0f} min at that rate")
    if c.get("data_ready_s") is not None:
        s += f"; its data were generated and prepared {c['data_ready_s']:.0f} s after the start"
    else:
        s += "; its data were not ready when the step ended (gpu_check.log has the generation's output)"
    lines.append(s)
print("\n".join(lines))
EOF
echo
cat "$OUT/summary.md"
echo
echo "outputs: $OUT"
for s in "${STEPS[@]}"; do
    [[ $s == *"|ok|"* || $s == *"|ok ("* ]] || exit 1
done
