import math
import os

import numpy as np
import pytest
import torch

from fakedet.config import TrainConfig, dense_eval_points
from fakedet.preprocess import algorithms, ieee_float32, preprocess
from fakedet.train import BatchSchedule, eval_steps, train


def curves(history):
    """The history without wall-clock times (which differ between identical runs)."""
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


def small_cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "device": "cpu", **kw})


def test_same_seed_gives_identical_history_and_weights(toy):
    data, test = toy(160, 0), toy(64, 1, "cifake_test")
    a = train(small_cfg(eval_at=(0.5, 1)), data, {"cifake_test": test})
    b = train(small_cfg(eval_at=(0.5, 1)), data, {"cifake_test": test})
    assert curves(a.history) == curves(b.history)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    c = train(small_cfg(eval_at=(0.5, 1), seed=12), data, {"cifake_test": test})
    assert c.history[-1]["metrics"]["cifake_test"]["loss"] != a.history[-1]["metrics"]["cifake_test"]["loss"]


def test_learns_a_learnable_toy_task(toy):
    result = train(TrainConfig(epochs=4, lr=1e-2, device="cpu"), toy(512, 0), {"cifake_test": toy(256, 1, "cifake_test")})
    assert result.final["metrics"]["cifake_test"]["acc"] > 0.9
    assert result.history[-1]["metrics"]["train"]["loss"] < 0.5


def test_reference_schedule_fixed_batches_reshuffled_each_epoch():
    s = BatchSchedule(100, 32, "reference", seed=11)
    assert s.steps_per_epoch == 3  # the remainder of 4 is dropped, as by the reference loader
    e0, e1 = s.epoch(0), s.epoch(1)
    batches0 = sorted(tuple(sorted(b)) for b in e0)
    batches1 = sorted(tuple(sorted(b)) for b in e1)
    assert batches0 == batches1  # the same fixed batches...
    assert [list(b) for b in e0] != [list(b) for b in e1]  # ...in another order, or permuted inside
    used = np.concatenate(e0)
    assert len(used) == 96 and len(set(used)) == 96
    assert [list(b) for b in BatchSchedule(100, 32, "reference", 11).epoch(1)] == [list(b) for b in e1]  # seeded


def test_full_schedule_fresh_permutation_every_epoch_keeps_last_partial_batch():
    s = BatchSchedule(100, 32, "full", seed=11)
    assert s.steps_per_epoch == 4
    e0, e1 = s.epoch(0), s.epoch(1)
    assert [len(b) for b in e0] == [32, 32, 32, 4]
    assert sorted(np.concatenate(e0)) == list(range(100))
    # batches are not fixed: the first batch of epoch 1 is not one of epoch 0's batches
    assert set(map(frozenset, e1)) != set(map(frozenset, e0))


def test_eval_points_are_steps_with_fractions_of_the_first_epoch(toy):
    cfg = small_cfg(epochs=3, eval_at=(0.05, 0.25, 1, 2))
    assert eval_steps(cfg, 20) == [1, 5, 20, 40, 60]
    data = toy(320, 0)
    result = train(cfg, data, {"cifake_test": toy(32, 1)})
    assert [round(h["epoch"], 3) for h in result.history] == [0.05, 0.25, 1.0, 2.0, 3.0]
    assert all("cifake_test" in h["metrics"] and "loss" in h["metrics"]["train"] for h in result.history)


def test_prefix_of_a_longer_run_equals_the_shorter_run(toy):
    data, test = toy(128, 0), toy(64, 1, "cifake_test")
    long = train(small_cfg(epochs=4, eval_at=(2,)), data, {"cifake_test": test})
    short = train(small_cfg(epochs=2), data, {"cifake_test": test})
    at2 = next(h for h in long.history if h["epoch"] == 2)
    assert at2["metrics"] == short.final["metrics"]


def test_resume_from_a_snapshot_continues_exactly(toy):
    data, test = toy(128, 0), toy(64, 1, "cifake_test")
    cfg = small_cfg(epochs=3, eval_at=(0.5, 1, 2))
    full = train(cfg, data, {"cifake_test": test})
    saved = {}

    def stop_at_first_epoch(record, snapshot):
        if record.epoch == 1:
            saved["state"] = snapshot()
            return True
        return None

    partial = train(cfg, data, {"cifake_test": test}, on_eval=stop_at_first_epoch)
    assert partial.stopped_early and len(partial.history) == 2
    resumed = train(cfg, data, {"cifake_test": test}, resume=saved["state"])
    assert curves(resumed.history) == curves(full.history)
    with pytest.raises(ValueError, match="different config"):
        train(small_cfg(epochs=3, lr=0.5), data, resume=saved["state"])


def test_callback_sees_logits_of_every_set(toy):
    seen = []
    train(small_cfg(epochs=1), toy(64, 0), {"a": toy(10, 1), "b": toy(7, 2, real_only=True)},
          on_eval=lambda record, snapshot: seen.append({k: v.shape for k, v in record.logits.items()}))
    assert seen == [{"a": (10,), "b": (7,)}]


def test_real_only_set_is_scored_by_real_recall(toy):
    result = train(small_cfg(epochs=1), toy(64, 0), {"cifar100_test": toy(20, 1, real_only=True)})
    m = result.final["metrics"]["cifar100_test"]
    assert 0 <= m["real_recall"] <= 1 and "acc" not in m


@pytest.mark.parametrize(
    "kw, message",
    [({"srm": "pool9"}, "srm: unknown SRM placement 'pool9'"), ({"lr": 0}, "lr: Input should be greater than 0, got 0"),
     ({"epochs": 0}, "epochs: Input should be greater than 0"),
     ({"eval_at": (5,), "epochs": 2}, r"eval_at points must lie in \(0, epochs=2\]"), ({"shuffle": "random"}, "shuffle: Input should be 'reference' or 'full'"),
     ({"seed": -1}, "seed: Input should be greater than or equal to 0, got -1"), ({"seed": 2**64}, "seed: Input should be less than"),
     ({"seed": 1.5}, "seed: Input should be a valid integer"), ({"deterministic": "yes"}, "deterministic: Input should be a valid boolean")],
)
def test_bad_configs_are_refused_with_a_clear_message(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_training_set_needs_both_classes(toy):
    with pytest.raises(ValueError, match="both REAL and FAKE"):
        train(small_cfg(), toy(64, 0, real_only=True))


def test_dense_points_cover_the_first_epoch_and_end():
    points = dense_eval_points(100)
    assert points[0] < 0.1 and 1.0 in points and 10.0 in points and points[-1] == 100
    assert list(points) == sorted(set(points))


def test_seed_bounds_are_the_rngs_bounds():
    for seed in (0, 2**64 - 1, np.int64(7)):  # numpy and torch both take these
        TrainConfig(seed=seed)
        np.random.default_rng([seed, 0])
        torch.Generator().manual_seed(int(seed))


def test_batch_normalised_on_its_own_equals_rows_of_the_normalised_set():
    # training keeps uint8 images and normalises each batch: the bits of the old normalise-once path
    images = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    idx = torch.from_numpy(np.random.default_rng(1).permutation(300)[:32])
    assert torch.equal(preprocess(torch.from_numpy(images)[idx]), preprocess(images)[idx])


def test_deterministic_mode_changes_nothing_on_the_cpu_and_restores_global_flags(toy):
    data, test = toy(96, 0), toy(32, 1, "cifake_test")
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    fast = train(small_cfg(epochs=1), data, {"cifake_test": test})
    exact = train(small_cfg(epochs=1, deterministic=True), data, {"cifake_test": test})
    assert curves(fast.history) == curves(exact.history)
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    assert after == before


def first_state(cfg, data):
    """The resumable state at the first evaluation point of `cfg` on `data`."""
    saved = []

    def keep_and_stop(record, snapshot):
        saved.append(snapshot())
        return True

    train(cfg, data, on_eval=keep_and_stop)
    return saved[0]


def test_float32_mode_turns_tf32_off_and_back():
    before = torch.backends.cudnn.allow_tf32
    with ieee_float32():
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 == before


def test_deterministic_mode_refuses_a_process_that_used_cuda_without_the_cublas_setting(monkeypatch):
    # torch reads CUBLAS_WORKSPACE_CONFIG at the process's first cuBLAS call: too late to set it then
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        with algorithms(True):
            pass
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_a_state_resumes_under_the_other_algorithm_choice(toy):
    data = toy(64, 0)
    state = first_state(small_cfg(epochs=2, eval_at=(1,)), data)
    resumed = train(small_cfg(epochs=2, eval_at=(1,), deterministic=True), data, resume=state)
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0]


class HostReads:
    """Counts every way a tensor's values reach Python: what would make the host wait for a GPU."""

    METHODS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__array__")

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def method(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return method


def test_training_steps_read_nothing_back_to_the_host(toy, monkeypatch):
    # The CPU stand-in for tests/test_gpu.py's sync check: with the same evaluation points, twice the
    # steps must not read one value more (reads happen at evaluation points only).
    data, test = toy(160, 0), toy(40, 1, "cifake_test")
    reads = HostReads(monkeypatch)
    train(small_cfg(epochs=1, batch_size=16), data, {"cifake_test": test})
    one_epoch, reads.count = reads.count, 0
    train(small_cfg(epochs=2, batch_size=16), data, {"cifake_test": test})
    assert reads.count == one_epoch > 0


def diverged_state(cfg, data):
    """A resumable state at the first evaluation point, with NaN in one weight (a blown-up run)."""
    state = first_state(cfg, data)
    state["model"]["fc3.weight"][0, 0] = float("nan")
    return state


def test_divergence_ends_training_at_the_point_that_sees_it(toy):
    data, test, cifar = toy(64, 0), toy(32, 1, "cifake_test"), toy(20, 2, real_only=True)
    cfg = small_cfg(epochs=3, eval_at=(1, 2))
    state = diverged_state(cfg, data)
    seen = []
    result = train(cfg, data, {"cifake_test": test, "cifar100_test": cifar}, resume=state,
                   on_eval=lambda record, snapshot: seen.append(record.diverged))
    assert result.diverged and not result.stopped_early
    assert seen == [True]  # the callback saw the diverged point; nothing was trained after it
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    assert [h["diverged"] for h in result.history] == [False, True]
    final = result.final["metrics"]
    assert math.isnan(final["train"]["loss"])
    assert final["cifake_test"] == {"nonfinite": 32, "n": 32} and final["cifar100_test"] == {"nonfinite": 20, "n": 20}


def test_a_learning_rate_far_too_high_diverges_without_an_exception(toy):
    cfg = small_cfg(epochs=20, eval_at=(1, 2, 5, 10), lr=1e4, momentum=0.99)
    result = train(cfg, toy(64, 0), {"cifake_test": toy(32, 1)})
    assert result.diverged and result.history[-1]["diverged"] and result.final["epoch"] < 20
    assert not any(h["diverged"] for h in result.history[:-1])
