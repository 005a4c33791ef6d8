"""`fakedet train` as a user runs it."""

import json
import subprocess
import sys

import pytest
import torch

from fakedet.cli import main
from fakedet.models import load_checkpoint


@pytest.mark.slow  # `fakedet train --smoke` as a subprocess (10 s)
def test_train_smoke_writes_a_checkpoint_history_and_summary(tmp_path):
    out, history = tmp_path / "m.pt", tmp_path / "h.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fakedet", "train", "--smoke", "--srm", "pool2", "--eval-at", "0.5", "--cache-root", str(tmp_path / "cache"),
         "--out", str(out), "--history", str(history), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the summary table: one row per evaluation set, the study's metrics as columns
    for name in ("cifake_test", "cifake_val", "cifar100_test", "agiri_test", "agiri_val"):
        assert name in proc.stdout
    assert "acc" in proc.stdout and "real_recall" in proc.stdout
    model, config = load_checkpoint(out)
    assert config["srm"] == "pool2" and config["epochs"] == 1
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1,)
    record = json.loads(history.read_text())
    # 0.5 epochs lands on the nearest whole step (the tiny stand-in has 11 steps per epoch: step 6 = 0.545)
    epochs = [h["epoch"] for h in record["history"]]
    assert len(epochs) == 2 and abs(epochs[0] - 0.5) <= 1 / 11 and epochs[1] == 1.0
    # and says so, once, before training
    assert proc.stderr.count(f"0.5 → {epochs[0]:.3g}") == 1, proc.stderr[-2000:]
    assert record["config"]["srm"] == "pool2" and record["data_hash"]
    for key in ("code_version", "versions", "hardware"):
        assert key in record
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"].startswith(torch.__version__.split("+")[0])


def test_train_bad_config_exits_2_as_a_user_sees_it(tmp_path):
    """The one bad-config case run as a process (the exit code a shell sees); the others run in-process below."""
    proc = subprocess.run([sys.executable, "-m", "fakedet", "train", "--lr", "-1", "--cache-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "lr: Input should be greater than 0, got -1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("args, message", [(["--lr", "-1"], "lr: Input should be greater than 0, got -1"), (["--seed", "-1"], "seed: Input should be greater than or equal to 0, got -1")])
def test_train_bad_config_is_a_clear_error(tmp_path, capsys, args, message):
    assert main(["train", *args, "--cache-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir()), "nothing prepared for a config that cannot train"


def test_a_diverging_run_says_so_in_one_line_and_writes_no_checkpoint(tmp_path, tiny_root, capsys):
    out, history = tmp_path / "m.pt", tmp_path / "h.json"
    # lr 10 with momentum 0.99 blows the weights up within the tiny stand-in's first epoch
    rc = main(["train", "--smoke", "--lr", "10", "--momentum", "0.99", "--eval-at", "0.5", "--cache-root", str(tiny_root),
               "--out", str(out), "--history", str(history), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("fakedet train:")]
    assert len(errors) == 1 and "the run diverged at epoch" in errors[0] and "no checkpoint written" in errors[0]
    assert not out.exists()
    points = json.loads(history.read_text())["history"]
    assert points[-1]["diverged"] and not any(p["diverged"] for p in points[:-1])


def test_rounded_evaluation_points_are_the_ones_between_steps():
    from fakedet.config import TrainConfig
    from fakedet.train import rounded_points, rounding_note

    cfg = TrainConfig(epochs=2, batch_size=32, eval_at=(0.25, 0.5, 1.0))
    assert rounded_points(cfg, 32 * 8) == []  # 8 steps an epoch: every point on a step
    assert rounding_note(cfg, 32 * 8) is None
    # 11 steps an epoch (the reference shuffle drops the last partial batch): 0.25 -> 3/11, 0.5 -> 6/11 (5.5 rounds to even)
    assert rounded_points(cfg, 32 * 11 + 5) == [(0.25, 3 / 11), (0.5, 6 / 11)]
    assert "0.25 → 0.273, 0.5 → 0.545" in rounding_note(cfg, 32 * 11 + 5)
