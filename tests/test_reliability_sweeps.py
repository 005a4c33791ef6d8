"""Faults met mid-sweep, run as a user meets them (one trial of the smoke ablation each): a disk that fills
while trials save their checkpoints, SIGTERM with stdout's reader gone, a garbled checkpoint. Each stops
with one line and its own status, and `--resume` continues without loss or duplicates."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from fakedet.sweep.refusals import Exit

pytestmark = pytest.mark.slow


def resume_args(workspace, name: str, storage: Path) -> list[str]:
    return [*workspace.command, "ablation", "--resume", name, "--storage-path", str(storage), "--ray-temp-dir",
            str(workspace.ray_tmp), "--num-cpus", "2", "--cache-root", str(workspace.cache)]


def one_trial(workspace, name: str, storage: Path) -> list[str]:
    """The smoke ablation cut to one trial: one trajectory to 3 epochs, evaluated at 0.5, 1 and 3."""
    args = workspace.args(name, "--srm", "none", "--seeds", "1", "--epochs", "1,3")
    args[args.index("--storage-path") + 1] = str(storage)
    return args


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_every_point_once(workspace, name: str) -> None:
    c, parent, children = workspace.runs(name)
    assert parent.info.status == "FINISHED"
    keys = [r.data.tags["fakedet.cell_key"] for r in children]
    assert len(keys) == len(set(keys)) == 2 and all(r.info.status == "FINISHED" for r in children)
    for r in children:  # every evaluation point of the cell, each once: 0.5, 1 (and 3)
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "cifake_test/acc")]
        assert len(steps) == len(set(steps)) == {1.0: 2, 3.0: 3}[float(r.data.params["epochs"])], (r.info.run_name, steps)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}): no real full disk to fill")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1):  # the last blocks one byte at a time
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_killed_while_planning_then_a_full_disk_then_resume_finishes_every_cell_once(workspace, run, small_disk):
    """A driver killed while it planned, resumed: Tune starts afresh from the recorded plan. Its storage is on
    a 40 MB tmpfs, filled to the last byte once the trial's first checkpoint is there: the next checkpoint
    meets ENOSPC. The sweep stops at once (no retry burnt on it) with one line and exit 72;
    with the space freed, `--resume` finishes every cell, each evaluation point logged once."""
    storage = small_disk / "ray_results"
    # first the driver is killed while it plans: its sweep file and cell runs exist, Tune's state does not
    killed = run([*one_trial(workspace, "full1", storage), "--kill-after-planning"])
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert (storage / "full1" / "fakedet_sweep.json").is_file() and not (storage / "full1" / "tuner.pkl").exists()
    # its resume starts Tune afresh from the recorded plan, and meets the full disk
    proc = subprocess.Popen(resume_args(workspace, "full1", storage), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    filler, deadline = None, time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if filler is None and list(storage.glob("full1/trial_*/checkpoint_000000/state.pt")):
            filler = fill(small_disk)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=300)
    assert filler is not None, "the sweep ended before its first checkpoint was seen: " + out[-2000:]
    assert "holds no Tune state yet" in out, out[-3000:]
    assert proc.returncode == Exit.DISK_FULL, out[-3000:] + err[-3000:]
    assert len(error_lines(err)) == 1 and "no space left" in error_lines(err)[0] and str(storage) in error_lines(err)[0], err[-3000:]
    assert "Traceback" not in err and "[retry]" not in out, err[-3000:]
    assert "--resume full1" in err

    filler.unlink()
    resumed = run(resume_args(workspace, "full1", storage))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_every_point_once(workspace, "full1")


def test_sigterm_with_stdout_gone_stops_resumably_and_a_truncated_checkpoint_is_one_line(workspace, run, tmp_path):
    """SIGTERM mid-training, stdout's reader gone after 3 lines (`| head -3`): the sweep goes on until then,
    stops as on Ctrl-C with exit 143, says its resume command on stderr, and closes its parent run as KILLED.
    Then the trial's last checkpoint is cut short: `--resume` stops with one line naming it, exit 66, without
    retrying the trial on the same file."""
    storage = tmp_path / "ray_results"
    stderr_file = tmp_path / "stderr.txt"
    with open(stderr_file, "w") as stderr:
        proc = subprocess.Popen(one_trial(workspace, "term1", storage), stdout=subprocess.PIPE, stderr=stderr, text=True)
        head = [proc.stdout.readline() for _ in range(3)]
        proc.stdout.close()  # the reader has gone: the sweep's next writes to stdout meet EPIPE
        db, deadline, finished = workspace.root / "mlflow.db", time.time() + 600, 0
        while time.time() < deadline and proc.poll() is None and not finished:
            time.sleep(0.5)
            with sqlite3.connect(db) as con:
                finished = con.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid where "
                                       "t.key = 'fakedet.sweep' and t.value = 'term1' and r.status = 'FINISHED'").fetchone()[0]
        assert proc.poll() is None, "the sweep ended before it could be stopped: " + stderr_file.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    err = stderr_file.read_text()
    assert len([line for line in head if line]) == 3
    assert proc.returncode == Exit.TERMINATED, err[-3000:]
    assert "terminated (SIGTERM)" in err and "--resume term1" in err, err[-3000:]
    assert "Broken pipe" not in err and "Traceback" not in err, err[-3000:]
    c, parent, _ = workspace.runs("term1")
    assert parent.info.status == "KILLED"

    # the checkpoint Tune restores: the last one the driver registered, one per reported point (a later one
    # may be on disk, saved by the trial while the driver stopped; the resumed trial writes it again)
    trial_dir = next(storage.glob("term1/trial_*"))
    reported = len((trial_dir / "result.json").read_text().splitlines())
    last = trial_dir / f"checkpoint_{reported - 1:06d}" / "state.pt"
    last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])  # cut short, as a full disk or a kill leaves it
    refused = run(resume_args(workspace, "term1", storage))
    assert refused.returncode == Exit.CORRUPT_STATE, refused.stdout[-3000:] + refused.stderr[-3000:]
    lines = error_lines(refused.stderr)
    assert len(lines) == 1 and str(last) in lines[0] and "does not load" in lines[0], refused.stderr[-3000:]
    assert "[retry]" not in refused.stdout and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    errors = list(storage.glob("term1/trial_*/error.txt"))
    assert len(errors) == 1 and errors[0].read_text().count("Failure # ") == 1  # failed once, not max_failures + 1 times
    assert c.get_run(parent.info.run_id).info.status == "KILLED"
