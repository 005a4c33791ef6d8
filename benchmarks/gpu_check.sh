#!/usr/bin/env bash
# The GPU checks in one go, about 5 minutes on one GPU (each step has a time limit; $BUDGET bounds the whole):
#   1. env       what is there: torch, CUDA, the GPU, ray/mlflow/optuna
#   2. tests     python -m pytest -m gpu tests/test_gpu.py (CPU agreement, checkpoints GPU->CPU->GPU, the
#                reference checkpoints and `fakedet predict` on the GPU, resume and prefix sharing, no host
#                synchronisation in the steps, a CIFAKE-scale trial's device memory, four Ray trials on one GPU)
#   3. ablation  python sweeps/run.py ablation --smoke --seeds 2 --bundle 1 --gpus-per-trial 0.25: four trials, one GPU
#   4. bench     one model at batch 32: fakedet's loop against the reference-style loop
#   5. bench_det the same in the deterministic mode (its cost)
#   6. bench_4   four concurrent trials on one device at CIFAKE scale (90,000 images): images/s and
#                torch.cuda.max_memory_allocated per trial
#   7. bundle    benchmarks/bench_bundle.py: K = 1, 4, 16, 64 models in one process (one fused step)
#                against K separate processes of train(), images/s summed over models
#   8. ablation_bundle  the smoke ablation with --seeds 2 --bundle 2: half the trials, the same cells
# then prints a summary to paste into the README (also written to summary.md).
#
#   benchmarks/gpu_check.sh              on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run    the same steps on the CPU at tiny sizes (DEVICE=cpu does the same):
#                                        the tests run on the CPU, Ray is told of one (absent) GPU
#
# Outputs go to $OUT if set, else to a new folder under /tmp: gpu_check.log (every step's full output),
# the figures as JSON (gpu_tests.json, bench_one.json, bench_det.json, bench_four.json) and summary.md.
# The sweep's data cache, Ray and MLflow stores go to a temp folder of their own, removed at the end.
# Each step has a time limit; the whole run stops starting steps after $BUDGET seconds (default 540 on
# a GPU, so that it ends within a 10-minute slot). A failed step does not stop the others; the exit
# status is 1 if any step failed.
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
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
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
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
# Ray's socket paths must stay short: its temp dir goes under /tmp directly
RAY_TMP=$(mktemp -d /tmp/fdgc.XXXXXX)
trap 'rm -rf "$WORK" "$RAY_TMP"' EXIT
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -z ${FAKEDET_REFERENCE_DIR:-} && -d $REPO/../shared/reference ]]; then
    export FAKEDET_REFERENCE_DIR=$REPO/../shared/reference
fi

if [[ $DRY == 1 ]]; then
    # sizes for 2 shared CPU cores: the same steps, smaller
    BUDGET=${BUDGET:-3600}
    T_TESTS=1500; T_ABLATION=1200; T_BENCH=300; T_BENCH4=600; T_BUNDLE=600
    BENCH_BUNDLE=(--n-images 2000 --steps 20 --ks 1,4 --threads 1)
    BENCH_ONE=(--images 2000 --epochs 1 --repeats 1)
    BENCH_FOUR=(--images 4000 --epochs 0.5)
    RAY_CPUS=4
    # Ray schedules `--gpus-per-trial 0.25` only where it counts a GPU: declare one (the trials train on the CPU)
    ABLATION_ENV=(RAY_OVERRIDE_RESOURCES='{"GPU": 1}')
else
    BUDGET=${BUDGET:-540}
    T_TESTS=200; T_ABLATION=180; T_BENCH=75; T_BENCH4=90; T_BUNDLE=120
    BENCH_BUNDLE=(--n-images 90000 --steps 200 --ks 1,4,16,64)  # CIFAKE scale; 200 steps per model
    BENCH_ONE=(--images 20000 --epochs 1 --repeats 3)
    BENCH_FOUR=(--images 90000 --epochs 0.25)  # CIFAKE's training split; a quarter epoch is 703 steps per trial
    RAY_CPUS=8
    ABLATION_ENV=()
fi

START=$(date +%s)
STEPS=()  # name|status|seconds

# run_step NAME LIMIT COMMAND...: runs with a time limit (cut to what is left of $BUDGET), appends the
# output to $LOG, prints its tail, records status and seconds; never stops the script.
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
    if ((rc == 124 || rc == 137)); then status="timed out after ${limit}s"; elif ((rc != 0)); then status="failed (exit $rc)"; fi
    echo "== $name: $status in ${secs}s" | tee -a "$LOG"
    STEPS+=("$name|$status|$secs")
    return 0
}

run_step env 60 "$PY" - "$DEVICE" <<'EOF'
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
run_step ablation_bundle "$T_ABLATION" env "${ABLATION_ENV[@]}" "$PY" sweeps/run.py ablation --smoke --seeds 2 --bundle 2 \
    --gpus-per-trial 0.25 --num-cpus "$RAY_CPUS" --name gpucheck-bundle --cache-root "$WORK/cache" \
    --storage-path "$WORK/ray_results" --tracking-uri "sqlite:///$WORK/mlflow.db" --ray-temp-dir "$RAY_TMP"

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
print("\n".join(lines))
EOF
echo
cat "$OUT/summary.md"
echo
echo "outputs: $OUT"
for s in "${STEPS[@]}"; do
    [[ $s == *"|ok|"* ]] || exit 1
done
