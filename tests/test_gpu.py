"""What only shows on a GPU: `python -m pytest -m gpu` (benchmarks/gpu_check.sh runs these with the smoke
sweep on GPUs and the throughput figures).

Every test here is marked `gpu` and skips without CUDA. `FAKEDET_GPU_TEST_DEVICE=cpu` runs them on the
CPU instead: a dry run of the same code paths, in which the device-against-CPU comparisons hold
trivially. The differences measured are written to `$FAKEDET_GPU_REPORT` (JSON) when it is set, so that
the tolerances below can be checked against what a GPU gives (gpu_check.sh prints them).

Tolerances. Both sides compute in IEEE float32 (fakedet turns cuDNN's TF32 off, see
`fakedet.preprocess.ieee_float32`); what differs is the order of summation inside convolutions and
matrix products (~1e-7 relative per operation), which SGD carries forward. For the short runs here
(32 to 48 steps) we allow LOSS_TOL on every mean loss and AUC and LOGIT_TOL on every logit. Runs in the
deterministic mode must repeat and resume bit for bit on the GPU, as on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.models import load_checkpoint, load_reference_checkpoint, save_checkpoint
from fakedet.preprocess import CUBLAS_DETERMINISTIC, predict_proba
from fakedet.train import train
from test_reference_checkpoints import CHECKPOINTS, REFERENCE, decode, image_files, reference_proba  # noqa: F401

# The deterministic runs below share this process with fast ones, so cuBLAS's setting must be in place
# before the first GPU work (see fakedet.preprocess.algorithms); test modules are imported before any test runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
DEVICE = os.environ.get("FAKEDET_GPU_TEST_DEVICE", "cuda")
ON_CUDA = torch.device(DEVICE).type == "cuda"
LOSS_TOL = 1e-4
LOGIT_TOL = 1e-3

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason="no CUDA device (FAKEDET_GPU_TEST_DEVICE=cpu runs these on the CPU as a dry run)"),
]
needs_reference = pytest.mark.skipif(
    not all((REFERENCE / name).is_file() for name, _ in CHECKPOINTS),
    reason=f"the study's checkpoints are not at {REFERENCE} (set FAKEDET_REFERENCE_DIR)",
)

MEASURED: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield MEASURED
    path = os.environ.get("FAKEDET_GPU_REPORT")
    if path:
        name = torch.cuda.get_device_name() if ON_CUDA else "cpu"
        Path(path).write_text(json.dumps({"device": DEVICE, "device_name": name, "torch": torch.__version__,
                                          "loss_tol": LOSS_TOL, "logit_tol": LOGIT_TOL, "measured": MEASURED}, indent=1))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 1e-2, "eval_at": (0.5, 1), "device": DEVICE, **kw})


def data(toy):
    return toy(256, 0), {"cifake_test": toy(96, 1, "cifake_test"), "cifar100_test": toy(40, 2, real_only=True)}


def with_logits(config, train_set, eval_sets):
    """(result, logits per set at the last point)."""
    seen = {}
    result = train(config, train_set, eval_sets, on_eval=lambda record, snapshot: seen.update(record.logits))
    return result, seen


def scores(history) -> dict[str, float]:
    """Every continuous score of a history: mean losses and AUCs, per point and set."""
    return {f"{h['step']}/{s}/{k}": v for h in history for s, m in h["metrics"].items()
            for k, v in m.items() if k in ("loss", "auc")}


def max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


def max_logit_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_train_on_the_device_matches_the_cpu(toy, deterministic):
    train_set, eval_sets = data(toy)
    on_cpu, cpu_logits = with_logits(cfg(device="cpu"), train_set, eval_sets)
    on_device, device_logits = with_logits(cfg(deterministic=deterministic), train_set, eval_sets)
    assert next(on_device.model.parameters()).device.type == torch.device(DEVICE).type
    loss_diff = max_difference(scores(on_cpu.history), scores(on_device.history))
    logit_diff = max_logit_difference(cpu_logits, device_logits)
    MEASURED[f"cpu_vs_device_{'deterministic' if deterministic else 'fast'}"] = {"loss_auc": loss_diff, "logit": logit_diff}
    assert loss_diff <= LOSS_TOL and logit_diff <= LOGIT_TOL
    # the same steps and evaluation points, and the same decisions wherever a logit is not within tolerance of 0
    assert [h["step"] for h in on_cpu.history] == [h["step"] for h in on_device.history]
    for name, logits in cpu_logits.items():
        clear = np.abs(logits) > LOGIT_TOL
        assert np.array_equal((logits > 0)[clear], (device_logits[name] > 0)[clear])


def curves(history):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_resume_and_prefix_sharing_on_the_device(toy, deterministic):
    train_set, eval_sets = data(toy)
    config = cfg(epochs=3, eval_at=(1, 2), deterministic=deterministic)
    full = train(config, train_set, eval_sets)
    saved = []

    def stop_at_epoch_1(record, snapshot):
        if record.epoch == 1:
            saved.append(snapshot())
            return True
        return None

    train(config, train_set, eval_sets, on_eval=stop_at_epoch_1)
    resumed = train(config, train_set, eval_sets, resume=saved[0])
    short = train(cfg(epochs=2, eval_at=(1,), deterministic=deterministic), train_set, eval_sets)
    resume_diff = max_difference(scores(full.history), scores(resumed.history))
    prefix_diff = max_difference(scores(full.history[:2]), scores(short.history))
    MEASURED[f"resume_{'deterministic' if deterministic else 'fast'}"] = resume_diff
    MEASURED[f"prefix_{'deterministic' if deterministic else 'fast'}"] = prefix_diff
    if deterministic or not ON_CUDA:
        assert curves(resumed.history) == curves(full.history)
        assert curves(short.history) == curves(full.history[:2])
    else:
        assert resume_diff <= LOSS_TOL and prefix_diff <= LOSS_TOL


def test_a_device_checkpoint_loads_on_the_cpu_and_back(toy, tmp_path):
    train_set, eval_sets = data(toy)
    config = cfg(epochs=3, eval_at=(1, 2))
    saved = []

    def keep(record, snapshot):
        saved.append(snapshot())
        return True

    train(config, train_set, eval_sets, on_eval=keep)  # stops at epoch 1 on the device
    state = saved.pop()
    tensors = [*state["model"].values(), *[t for s in state["optimizer"]["state"].values() for t in s.values()]]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    torch.save(state, tmp_path / "device.pt")
    on_cpu = train(TrainConfig(**{**config.to_dict(), "device": "cpu"}), train_set, eval_sets,
                   resume=torch.load(tmp_path / "device.pt", weights_only=True), on_eval=keep)
    assert on_cpu.history[1]["epoch"] == 2  # continued on the CPU from epoch 1, stopped at 2
    torch.save(saved.pop(), tmp_path / "cpu.pt")
    back = train(config, train_set, eval_sets, resume=torch.load(tmp_path / "cpu.pt", weights_only=True))
    assert [h["epoch"] for h in back.history] == [1, 2, 3]
    assert next(back.model.parameters()).device.type == torch.device(DEVICE).type
    # a model file written from the device scores the same on the CPU
    save_checkpoint(tmp_path / "model.pt", back.model, config.to_dict())
    cpu_model, _ = load_checkpoint(tmp_path / "model.pt")
    images = eval_sets["cifake_test"].images
    np.testing.assert_allclose(predict_proba(cpu_model, images), predict_proba(back.model, images, device=DEVICE), atol=1e-5)


def fakedet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fakedet", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_fakedet_train_on_the_device_writes_a_checkpoint_that_loads_without_cuda(tmp_path, tiny_root):
    out = tmp_path / "m.pt"
    proc = fakedet("train", "--smoke", "--device", DEVICE, "--cache-root", str(tiny_root), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    blob = torch.load(out, weights_only=True)  # no map_location: every tensor must be on the CPU already
    assert all(t.device.type == "cpu" for t in blob["state_dict"].values())


@needs_reference
def test_reference_checkpoints_on_the_device(image_files, tmp_path):  # noqa: F811 - the imported fixture
    decoded = np.stack([decode(p) for p in image_files])
    for name, srm in CHECKPOINTS:
        expected = reference_proba(name, srm, image_files)  # the reference code, on the CPU
        model = load_reference_checkpoint(REFERENCE / name, srm).to(DEVICE)
        ours = predict_proba(model, decoded, batch_size=7)
        MEASURED[f"reference_{name}"] = float(np.abs(ours - expected).max())
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
        proc = fakedet("predict", "--device", DEVICE, "--reference-checkpoint", str(REFERENCE / name), "--srm", srm,
                       *map(str, image_files), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed = np.array([float(line.split(",")[-1]) for line in proc.stdout.splitlines()[1:]])
        np.testing.assert_allclose(printed, expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not ON_CUDA, reason="host synchronisation is a CUDA matter (tests/test_train.py counts host reads on the CPU)")
@pytest.mark.parametrize("srm, shuffle", [("none", "reference"), ("both", "full")])
def test_no_host_synchronisation_inside_the_training_steps(toy, srm, shuffle):
    train_set, eval_sets = data(toy)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode works: a read-back is refused
            float(torch.ones((), device=DEVICE))
        # two epochs: crosses an epoch boundary (the next epoch's batch order goes up) and three evaluation points;
        # the callback takes a snapshot, as the Ray trainable does
        result = train(cfg(srm=srm, shuffle=shuffle), train_set, eval_sets, on_eval=lambda record, snapshot: snapshot() and None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(result.history) == 3


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA (tests/test_graph.py checks their buffers on the CPU)")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("form, seeds", [("one", [11]), ("wide", [11, 11, 11]), ("vmap", [11, 12, 13])])
def test_a_cuda_graph_replays_the_training_steps_as_eager_steps_take_them(toy, monkeypatch, form, seeds, deterministic):
    import fakedet.train as train_module
    from fakedet.train import GraphStepper, train_models

    made = []

    class Counted(GraphStepper):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(train_module, "GraphStepper", Counted)
    train_set, eval_sets = data(toy)
    cfgs = [cfg(srm="pool1", seed=s, lr=lr, deterministic=deterministic) for s, lr in zip(seeds, (1e-2, 2e-2, 5e-3))]
    eager = train_models(cfgs, train_set, eval_sets)
    torch.cuda.set_sync_debug_mode("error")  # a replayed step, too, never waits for the device
    try:
        graphed = train_models([dataclasses.replace(c, cuda_graph=True) for c in cfgs], train_set, eval_sets)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    (stepper,) = made
    steps = graphed[0].history[-1]["step"]
    assert stepper.captures == 1 and stepper.replayed == steps - stepper.eager > 0
    diff = max(max_difference(scores(e.history), scores(g.history)) for e, g in zip(eager, graphed))
    MEASURED[f"graph_vs_eager_{form}_{'deterministic' if deterministic else 'fast'}"] = diff
    if deterministic:  # the same kernels on the same buffers
        assert all(curves(e.history) == curves(g.history) for e, g in zip(eager, graphed))
    else:
        assert diff <= LOSS_TOL


@pytest.mark.skipif(not ON_CUDA, reason="device memory is a CUDA figure (bench_train.py --concurrent measures RSS on the CPU)")
def test_a_cifake_scale_trial_keeps_its_images_as_uint8_on_the_device(toy):
    n = 90_000  # CIFAKE's training split after the 10% validation hold-out
    rng = np.random.default_rng(0)
    train_set = ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), (np.arange(n) % 2).astype(np.uint8))
    test = toy(10_000, 1, "cifake_test")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    train(cfg(epochs=0.01, eval_at=()), train_set, {"cifake_test": test})  # 28 steps and one evaluation
    peak = torch.cuda.max_memory_allocated() - base
    resident = (n + len(test)) * 32 * 32 * 3 + n * 4  # uint8 images, float32 labels
    MEASURED["cifake_scale_peak_bytes"] = peak
    MEASURED["cifake_scale_resident_bytes"] = resident
    # what lives on beside the data: weights, gradients, momentum, one evaluation batch of 1024 and its
    # activations, cuDNN's workspaces (while it benchmarks its algorithms, too)
    assert peak <= resident + 256 * 2**20
    assert peak < n * 32 * 32 * 3 * 4  # far below a float32 copy of the training images (1.1 GB)


def test_four_trials_share_one_device_under_ray(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from ray import tune

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    n_trials = 4

    def trial(config):
        # Imports inside: Ray ships this function to its workers by value.
        import os
        import time
        from pathlib import Path

        import numpy as np
        import torch
        from ray import tune

        from fakedet.arrays import ImageSet
        from fakedet.config import TrainConfig
        from fakedet.train import train

        # wait until all four trials are up at once: that proves they share the one device concurrently
        (Path(config["barrier"]) / str(config["seed"])).touch()
        deadline = time.monotonic() + 300
        while len(list(Path(config["barrier"]).iterdir())) < config["n"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the trials never ran at the same time")
            time.sleep(0.1)
        rng = np.random.default_rng(config["seed"])
        images = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
        result = train(TrainConfig(epochs=1, batch_size=16, seed=config["seed"]),  # device auto, as in a sweep
                       ImageSet(images, (np.arange(256) % 2).astype(np.uint8)))
        param = next(result.model.parameters())
        tune.report({"device": str(param.device), "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                     "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                     "max_memory_allocated": torch.cuda.max_memory_allocated() if param.is_cuda else 0,
                     "pid": os.getpid()})

    # Ray's socket paths must stay short: its temp dir goes under /tmp directly. On the CPU the one GPU is
    # declared (Ray then schedules and sets CUDA_VISIBLE_DEVICES as on a GPU node; trials train on the CPU).
    # The workers inherit this environment: they must import this checkout's fakedet.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    ray_tmp = tempfile.mkdtemp(prefix="fdgpu", dir="/tmp")
    ray.init(address="local", num_cpus=n_trials, num_gpus=1, include_dashboard=False, _temp_dir=ray_tmp)
    try:
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": 1, "gpu": 1 / n_trials}),
            param_space={"seed": tune.grid_search(list(range(11, 11 + n_trials))), "barrier": str(barrier), "n": n_trials},
            run_config=tune.RunConfig(name="fractional", storage_path=str(tmp_path / "ray_results"), verbose=0),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not results.errors, results.errors
    metrics = [r.metrics for r in results]
    assert len(metrics) == n_trials and len({m["pid"] for m in metrics}) == n_trials
    visible = {m["visible"] for m in metrics}
    assert len(visible) == 1 and visible != {""}, visible  # one device id, the same for all four
    expected = "cuda:0" if ON_CUDA else "cpu"
    assert all(m["device"] == expected for m in metrics), metrics
    if ON_CUDA:
        assert all(m["device_count"] == 1 for m in metrics)
    MEASURED["ray_fractional"] = {"visible": sorted(visible), "max_memory_allocated": [m["max_memory_allocated"] for m in metrics]}
