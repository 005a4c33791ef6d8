"""`fakedet predict`, run as a user runs it: `python -m fakedet predict ...` in a subprocess.

Each subprocess pays for importing torch and the rest (~3-4 s on 2 cores), so the invocations are
started together once per module and the tests read their results; error paths that need no
separate process are checked in-process through the same parser function.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakedet.data.decode import DecodeOptions, decode_image
from fakedet.models import build_model, load_checkpoint, load_reference_checkpoint, save_checkpoint
from fakedet.preprocess import predict_proba

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path) -> list[Path]:
    """Files of different sizes, modes and formats, plus two that cannot be read, in a fixed order."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:1:300j, 0:1:400j]
    smooth = np.stack([xx, yy, (xx + yy) / 2], -1)
    files = {}

    files["rgb32.png"] = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    rgba = np.dstack([rng.integers(0, 256, (40, 50, 3)), np.tile(np.linspace(0, 255, 50), (40, 1))]).astype(np.uint8)
    files["rgba.png"] = Image.fromarray(rgba, "RGBA")
    files["grey.png"] = Image.fromarray(rng.integers(0, 256, (64, 20), dtype=np.uint8), "L")
    files["broken.png"] = b"\x89PNG\r\n\x1a\n this is not really a PNG"
    files["palette.png"] = Image.fromarray((255 * smooth[:33, :33]).astype(np.uint8)).quantize(16)
    big = np.kron(255 * smooth, np.ones((4, 4, 1))) + rng.normal(0, 10, (1200, 1600, 3))
    files["big.jpg"] = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))  # 1600×1200
    files["missing.png"] = None  # never written
    files["grey16.png"] = Image.fromarray((65535 * smooth[:40, :40, 0]).astype(np.uint16))  # mode I;16
    files["cmyk.jpg"] = Image.fromarray((255 * smooth[:48, :48]).astype(np.uint8)).convert("CMYK")

    paths = []
    for name, content in files.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            content.save(path, **({"quality": 92} if name.endswith(".jpg") else {}))
        paths.append(path)
    assert Image.open(root / "grey16.png").mode == "I;16" and Image.open(root / "palette.png").mode == "P"
    return paths


UNREADABLE = {"broken.png", "missing.png"}


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def rows(self) -> list[list[str]]:
        return list(csv.reader(io.StringIO(self.stdout)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_cli")
    images = make_images(root)

    torch.manual_seed(0)
    # a file in the reference format: a bare state dict of the study's CNN with SRM at pool1
    reference = root / "reference_format.pth"
    torch.save(build_model(srm="pool1").state_dict(), reference)
    ours = root / "fakedet.pt"
    save_checkpoint(ours, build_model(srm="both"), {"arch": "cifar_cnn", "srm": "both"})

    good = [str(p) for p in images if p.name not in UNREADABLE]
    from test_data_files import special_files

    special = {str(root / "special" / k): v for k, v in special_files(root / "special").items()}
    invocations = {
        # batches of 3 cross the unreadable files: order and chunking are both exercised
        "reference": ["--reference-checkpoint", str(reference), "--srm", "pool1", "--batch-size", "3", *map(str, images)],
        "fakedet": ["--checkpoint", str(ours), "--device", "cpu", *good],
        "missing": ["--checkpoint", str(root / "nowhere.pt"), *good[:1]],
        # a FIFO, /dev/zero, a dangling link, a directory: each one line on stderr, never a hang
        "special": ["--checkpoint", str(ours), "--device", "cpu", *special, good[0]],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", "fakedet", "predict", *args],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for key, args in invocations.items()
    }
    runs = {}
    try:
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            runs[key] = Run(invocations[key], proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()  # a hung invocation fails its test, and is not left behind
    return {"images": images, "good": good, "reference": reference, "fakedet": ours, "runs": runs, "special": special}


def decoded(paths: list[str]) -> np.ndarray:
    return np.stack([decode_image(Path(p).read_bytes(), DecodeOptions()) for p in paths])


def test_reference_format_rows_in_order_and_equal_to_in_process(setup):
    run = setup["runs"]["reference"]
    assert run.returncode == 1, run.stderr  # two files could not be read
    rows = run.rows()
    assert rows[0] == ["path", "p_real"]
    assert [r[0] for r in rows[1:]] == setup["good"]  # the order given, unreadable ones left out
    printed = np.array([float(r[1]) for r in rows[1:]], dtype=np.float32)
    model = load_reference_checkpoint(setup["reference"], "pool1")
    expected = predict_proba(model, decoded(setup["good"]))
    np.testing.assert_allclose(printed, expected, rtol=0, atol=1e-6)
    assert expected.std() > 1e-4  # distinct scores, so a shuffled row order would be caught
    assert np.all((printed > 0) & (printed < 1))


def test_unreadable_files_are_reported_and_skipped(setup):
    run = setup["runs"]["reference"]
    lines = run.stderr.splitlines()
    broken = [line for line in lines if "broken.png" in line]
    missing = [line for line in lines if "missing.png" in line]
    assert len(broken) == 1 and "not an image" in broken[0]
    assert len(missing) == 1 and "No such file" in missing[0]
    assert any("2 of 9 images could not be read" in line for line in lines)
    assert "Traceback" not in run.stderr


def test_special_files_are_one_line_each_never_a_hang(setup):
    run = setup["runs"]["special"]
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    for path, reason in setup["special"].items():
        said = [line for line in lines if path in line]
        assert len(said) == 1 and said[0].startswith(f"fakedet predict: {path}: ") and reason in said[0], said
    assert any("4 of 5 images could not be read" in line for line in lines)
    assert [r[0] for r in run.rows()[1:]] == [setup["good"][0]] and "Traceback" not in run.stderr


def test_fakedet_checkpoint(setup):
    run = setup["runs"]["fakedet"]
    assert run.returncode == 0, run.stderr
    rows = run.rows()
    assert rows[0] == ["path", "p_real"] and [r[0] for r in rows[1:]] == setup["good"]
    model, config = load_checkpoint(setup["fakedet"])
    assert config["srm"] == "both"
    expected = predict_proba(model, decoded(setup["good"]))
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], expected, rtol=0, atol=1e-6)


def test_missing_checkpoint_exits_2(setup):
    run = setup["runs"]["missing"]
    assert run.returncode == 2
    assert "checkpoint not found" in run.stderr and "nowhere.pt" in run.stderr
    assert run.stdout == "" and "Traceback" not in run.stderr


# Checkpoint and argument errors: checked in-process through the same parser function (each
# subprocess costs seconds of torch import).


def parse_and_run(argv: list[str]) -> int:
    import argparse

    from fakedet.predict import add_predict_subcommand

    parser = argparse.ArgumentParser(prog="fakedet")
    add_predict_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *argv])
    return args.func(args)


def test_wrong_kind_of_checkpoint_exits_2(setup, capsys):
    reference, image = str(setup["reference"]), setup["good"][0]
    assert parse_and_run(["--checkpoint", reference, image]) == 2
    captured = capsys.readouterr()
    assert "not a fakedet checkpoint" in captured.err and "--reference-checkpoint" in captured.err
    assert captured.out == ""
    assert parse_and_run(["--reference-checkpoint", image, "--srm", "none", image]) == 2
    captured = capsys.readouterr()
    assert "cannot load" in captured.err and Path(image).name in captured.err
    assert captured.out == ""


def test_argument_errors(setup, capsys):
    reference, ours, image = str(setup["reference"]), str(setup["fakedet"]), setup["good"][0]
    assert parse_and_run(["--reference-checkpoint", reference, image]) == 2
    assert "needs --srm" in capsys.readouterr().err
    assert parse_and_run(["--checkpoint", ours, "--srm", "pool1", image]) == 2
    assert "--srm applies to --reference-checkpoint only" in capsys.readouterr().err
    assert parse_and_run(["--reference-checkpoint", reference, "--srm", "pool2", image]) == 2
    assert "pool2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: exactly one of the two checkpoint flags
        parse_and_run(["--checkpoint", ours, "--reference-checkpoint", reference, image])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        parse_and_run([image])
    capsys.readouterr()
