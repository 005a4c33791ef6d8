import numpy as np
import pytest
import torch

from conftest import toy_set
from fakedet.config import TrainConfig, dense_eval_points
from fakedet.train import BatchSchedule, eval_steps, train


def curves(history):
    """The history without wall-clock times (which differ between identical runs)."""
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


def small_cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "device": "cpu", **kw})


def test_same_seed_gives_identical_history_and_weights():
    data, test = toy_set(160, 0), toy_set(64, 1, "cifake_test")
    a = train(small_cfg(eval_at=(0.5, 1)), data, {"cifake_test": test})
    b = train(small_cfg(eval_at=(0.5, 1)), data, {"cifake_test": test})
    assert curves(a.history) == curves(b.history)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    c = train(small_cfg(eval_at=(0.5, 1), seed=12), data, {"cifake_test": test})
    assert c.history[-1]["metrics"]["cifake_test"]["loss"] != a.history[-1]["metrics"]["cifake_test"]["loss"]


def test_learns_a_learnable_toy_task():
    result = train(TrainConfig(epochs=4, lr=1e-2, device="cpu"), toy_set(512, 0), {"cifake_test": toy_set(256, 1, "cifake_test")})
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


def test_eval_points_are_steps_with_fractions_of_the_first_epoch():
    cfg = small_cfg(epochs=3, eval_at=(0.05, 0.25, 1, 2))
    assert eval_steps(cfg, 20) == [1, 5, 20, 40, 60]
    data = toy_set(320, 0)
    result = train(cfg, data, {"cifake_test": toy_set(32, 1)})
    assert [round(h["epoch"], 3) for h in result.history] == [0.05, 0.25, 1.0, 2.0, 3.0]
    assert all("cifake_test" in h["metrics"] and "loss" in h["metrics"]["train"] for h in result.history)


def test_prefix_of_a_longer_run_equals_the_shorter_run():
    data, test = toy_set(128, 0), toy_set(64, 1, "cifake_test")
    long = train(small_cfg(epochs=4, eval_at=(2,)), data, {"cifake_test": test})
    short = train(small_cfg(epochs=2), data, {"cifake_test": test})
    at2 = next(h for h in long.history if h["epoch"] == 2)
    assert at2["metrics"] == short.final["metrics"]


def test_resume_from_a_snapshot_continues_exactly():
    data, test = toy_set(128, 0), toy_set(64, 1, "cifake_test")
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


def test_callback_sees_logits_of_every_set():
    seen = []
    train(small_cfg(epochs=1), toy_set(64, 0), {"a": toy_set(10, 1), "b": toy_set(7, 2, real_only=True)},
          on_eval=lambda record, snapshot: seen.append({k: v.shape for k, v in record.logits.items()}))
    assert seen == [{"a": (10,), "b": (7,)}]


def test_real_only_set_is_scored_by_real_recall():
    result = train(small_cfg(epochs=1), toy_set(64, 0), {"cifar100_test": toy_set(20, 1, real_only=True)})
    m = result.final["metrics"]["cifar100_test"]
    assert 0 <= m["real_recall"] <= 1 and "acc" not in m


@pytest.mark.parametrize(
    "kw, message",
    [({"srm": "pool9"}, "srm placement"), ({"lr": 0}, "lr must be > 0"), ({"epochs": 0}, "epochs must be a positive"),
     ({"eval_at": (5,), "epochs": 2}, "eval_at points"), ({"shuffle": "random"}, "shuffle must be")],
)
def test_bad_configs_are_refused_with_a_clear_message(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_training_set_needs_both_classes():
    with pytest.raises(ValueError, match="both REAL and FAKE"):
        train(small_cfg(), toy_set(64, 0, real_only=True))


def test_dense_points_cover_the_first_epoch_and_end():
    points = dense_eval_points(100)
    assert points[0] < 0.1 and 1.0 in points and 10.0 in points and points[-1] == 100
    assert list(points) == sorted(set(points))
