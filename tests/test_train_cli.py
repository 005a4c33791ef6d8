"""`fakedet train` as a user runs it."""

import json
import subprocess
import sys

import torch

from fakedet.models import load_checkpoint


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
    assert record["config"]["srm"] == "pool2" and record["data_hash"]
    for key in ("code_version", "versions", "hardware"):
        assert key in record
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"].startswith(torch.__version__.split("+")[0])


def test_train_bad_config_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fakedet", "train", "--lr", "-1", "--cache-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "lr must be > 0" in proc.stderr
