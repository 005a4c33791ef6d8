"""The built-in stand-in: deterministic, in the real on-disk formats, and learnable but not trivially."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from fakedet.data import load_splits, make_synthetic, resolve_data
from fakedet.data.synthetic import DELIBERATE_CORRUPT, PLANT_GRATING_CYCLES, SIZES, cifake_name
from fakedet.data.options import PrepareOptions
from fakedet.data.splits import holdout
from fakedet.data.units import UnitStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_src(tiny_root) -> Path:
    return tiny_root / "synthetic-tiny" / "sources"


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.mark.slow  # worker pools of several sizes (5 s)
def test_deterministic_bytes_whatever_the_parallelism(tiny_src, tmp_path):
    again = make_synthetic(tmp_path / "again", "tiny", workers=0, show_progress=False)
    assert _tree_digest(again) == _tree_digest(tiny_src)
    other_seed = make_synthetic(tmp_path / "seed1", "tiny", seed=1, show_progress=False)
    assert _tree_digest(other_seed) != _tree_digest(tiny_src)


def test_idempotent_and_refuses_foreign_folders(tiny_src, tmp_path):
    assert make_synthetic(tiny_src, "tiny", show_progress=False) == tiny_src  # already there: nothing done
    with pytest.raises(FileExistsError, match="holds another stand-in"):
        make_synthetic(tiny_src, "small", show_progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic(tmp_path / "busy", "tiny", show_progress=False)


def test_cifake_size_trains_on_cifakes_90000_images():
    """The `cifake` size is CIFAKE's own: 90,000 training images once the validation split is held out
    (benchmarks/gpu_check.sh runs the whole grid at that scale), 20,000 test images."""
    size = SIZES["cifake"]
    labels = np.repeat([0, 1], size.cifake_train)
    keep, held = holdout(labels, PrepareOptions().val_fraction, PrepareOptions().seed)
    assert (len(keep), len(held), 2 * size.cifake_test) == (90_000, 10_000, 20_000)
    assert 2 * size.agiri_train > PrepareOptions().agiri_val_size  # AGIRI train holds the agiri_val sample


def test_cifake_format(tiny_src):
    size = SIZES["tiny"]
    for split, n in (("train", size.cifake_train), ("test", size.cifake_test)):
        for label in ("REAL", "FAKE"):
            files = sorted(p.name for p in (tiny_src / "cifake" / split / label).iterdir())
            assert len(files) == n
            assert all(re.fullmatch(r"\d+( \(\d+\))?\.jpg", f) for f in files), files[:5]
    assert (tiny_src / "cifake" / "train" / "REAL" / "0000 (10).jpg").is_file()
    assert (tiny_src / "cifake" / "train" / "FAKE" / "0 (10).jpg").is_file()
    assert cifake_name(19, "REAL") == "0001 (10).jpg" and cifake_name(10, "FAKE") == "1.jpg"
    with Image.open(tiny_src / "cifake" / "test" / "FAKE" / "0 (2).jpg") as im:
        assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"


def test_agiri_is_varied_and_has_corrupt_files(tiny_src):
    modes, formats, sizes = Counter(), Counter(), Counter()
    for p in (tiny_src / "agiri").rglob("*"):
        if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"):
            try:
                with Image.open(p) as im:
                    modes[im.mode] += 1
                    formats[im.format] += 1
                    sizes[im.size] += 1
            except Exception:  # noqa: BLE001 - the corrupt ones
                pass
    assert {"RGB", "L", "RGBA", "P"} <= set(modes) and len(modes) >= 6, modes
    assert {"JPEG", "PNG", "WEBP"} <= set(formats), formats
    assert len(sizes) >= 5 and any(w > 32 for w, _ in sizes) and any(w < 32 for w, _ in sizes)
    assert (tiny_src / "agiri" / "test" / "real" / "empty.jpg").stat().st_size == 0
    assert (tiny_src / "agiri" / "train" / ".DS_Store").is_file()


def test_the_standins_broken_files_are_the_ones_decoding_skips(tiny_root):
    agiri = json.loads((tiny_root / "synthetic-tiny" / "cache" / "manifest.json").read_text())["datasets"]["agiri"]
    skipped = {s["path"] for split in ("train", "test") for s in agiri[split]["skipped"]}
    assert agiri["source"]["standin"] and {p for p in DELIBERATE_CORRUPT if p.startswith("test/")} <= skipped
    assert skipped <= set(DELIBERATE_CORRUPT)


def test_deliberate_skips_are_said_as_such_and_others_warned(tmp_path, caplog):
    info = {"skipped": [{"path": "test/real/empty.jpg", "reason": "empty file (0 bytes)"},
                        {"path": "test/real/mine.jpg", "reason": "decode failed"}]}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fakedet.data"):
        UnitStore(tmp_path).warn_skips("agiri/test", info, DELIBERATE_CORRUPT)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["agiri/test: 1 file(s) skipped as intended: the stand-in breaks 'empty.jpg' on purpose, as the real "
                    "AGIRI has corrupt files; listed in manifest.json",
                    "agiri/test: skipped 1 file(s): test/real/mine.jpg: decode failed; all are listed in manifest.json"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fakedet.data"):
        UnitStore(tmp_path).warn_skips("agiri/test", info)  # not the stand-in: both are warned about
    assert [r.getMessage() for r in caplog.records] == [
        "agiri/test: skipped 2 file(s): test/real/empty.jpg: empty file (0 bytes); test/real/mine.jpg: decode failed; "
        "all are listed in manifest.json"]


def test_cifar100_pickles_are_the_toronto_format(tiny_src):
    folder = tiny_src / "cifar100" / "cifar-100-python"
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    with open(folder / "test", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (100 * SIZES["tiny"].cifar100_test, 3072)
    assert Counter(d[b"fine_labels"]) == {c: SIZES["tiny"].cifar100_test for c in range(100)}
    assert all(c == f // 5 for c, f in zip(d[b"coarse_labels"], d[b"fine_labels"]))
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20


def test_real_and_fake_differ_in_the_designed_way(tiny_root):
    """The fingerprint is there (fakes are smoother, reals noisier) but overlaps: not separable by one threshold."""
    sets = load_splits(tiny_root / "synthetic-tiny" / "cache")
    s = sets["cifake_train"]
    g = s.images.astype(np.float32).mean(-1)
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    energy = np.log(lap.var((1, 2)))
    real, fake = energy[s.labels == 1], energy[s.labels == 0]
    assert real.mean() > fake.mean() + 0.5
    best = max(((energy > t) == (s.labels == 1)).mean() for t in np.quantile(energy, np.linspace(0.02, 0.98, 49)))
    assert 0.7 < best < 0.97, best


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fakedet", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # the two CLIs as subprocesses, the stand-in generated and prepared (10 s)
def test_cli_make_synthetic_then_prepare_as_a_user_would(tmp_path):
    r = _run("make-synthetic", "sd", "--size", "tiny", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "not evidence about the real datasets" in r.stdout
    r = _run(
        "prepare",
        "--cifake",
        "sd/cifake",
        "--agiri",
        "sd/agiri",
        "--cifar100",
        "sd/cifar100",
        "--cache",
        "c",
        "--quiet",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"agiri/test\s+50\s+50\s+3\s+1", r.stdout), r.stdout  # real, fake, skipped, ignored
    assert "cifar100_test_jpeg" in r.stdout and "hash" in r.stdout
    # said, not silent, and said to be the stand-in's deliberate ones
    assert "agiri/test: 3 file(s) skipped as intended: the stand-in breaks 'corrupt truncated.jpg'" in r.stderr, r.stderr
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert set(m["datasets"]) == {"cifake", "agiri", "cifar100"}
    # --only and --sources
    r = _run(
        "prepare",
        "--sources",
        "sd",
        "--only",
        "cifake",
        "--cache",
        "c2",
        "--quiet",
        "--val-fraction",
        "0.25",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert set(json.loads((tmp_path / "c2" / "manifest.json").read_text())["sets"]) == {
        "cifake_train",
        "cifake_val",
        "cifake_test",
    }


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    (tmp_path / "wrong" / "train").mkdir(parents=True)
    r = _run("prepare", "--cifake", "wrong", "--only", "cifake", "--cache", "c", cwd=tmp_path)
    assert r.returncode == 2
    assert (
        r.stderr.startswith("error: cifake:")
        and "Expected the folders train/REAL" in r.stderr
        and "Traceback" not in r.stderr
    )


# ---- the planted variant -------------------------------------------------------------------------
def _cues(s) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the warm cast (mean red − blue) and the energy of the planted grating's frequency."""
    x = s.images.astype(np.float32) / 255
    cast = (x[..., 0] - x[..., 2]).mean((1, 2))
    g = x.mean(-1)
    spectrum = np.abs(np.fft.fft2(g - g.mean((1, 2), keepdims=True)))
    cx, cy = (int(c) for c in PLANT_GRATING_CYCLES)
    return cast, spectrum[:, cy, cx] + spectrum[:, -cy, -cx]


def test_planted_variant_changes_only_the_fakes_and_its_identity(tiny_src, tmp_path):
    r = _run("make-synthetic", "planted", "--size", "tiny", "--variant", "planted", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "(tiny, planted, seed 0)" in r.stdout
    planted = tmp_path / "planted"
    assert json.loads((planted / "STANDIN.json").read_text())["variant"] == "planted"
    assert "variant" not in json.loads((tiny_src / "STANDIN.json").read_text())  # the standard bytes, as before
    same = ["cifake/train/REAL", "cifake/test/REAL", "cifar100/cifar-100-python"]
    for sub in same:
        assert _tree_digest(planted / sub) == _tree_digest(tiny_src / sub), sub
    for sub in ("cifake/train/FAKE", "agiri/test/real", "agiri/test/fake"):
        assert _tree_digest(planted / sub) != _tree_digest(tiny_src / sub), sub
    with pytest.raises(FileExistsError, match="holds another stand-in"):
        make_synthetic(planted, "tiny", show_progress=False)
    with pytest.raises(FileExistsError, match="holds another stand-in"):
        make_synthetic(tiny_src, "tiny", variant="planted", show_progress=False)
    with pytest.raises(ValueError, match="unknown stand-in variant 'loud'"):
        make_synthetic(tmp_path / "x", "tiny", variant="loud", show_progress=False)


def test_planted_cues_are_where_standin_md_says(tmp_path):
    cache = resolve_data("synthetic", tmp_path, size="tiny", variant="planted", show_progress=False)
    assert cache.parent.name == "synthetic-tiny-planted"
    sets = load_splits(cache)
    s = sets["cifake_train"]
    cast, grating = _cues(s)
    fake = s.labels == 0
    assert 0.7 < roc_auc_score(fake, cast) < 0.95  # the transferable cue: partial on its own
    assert roc_auc_score(fake, grating) > 0.97  # the non-transferable cue: near perfect on CIFAKE
    agiri = [sets[k] for k in ("agiri_val", "agiri_test")]
    cast, grating = (np.concatenate(c) for c in zip(*map(_cues, agiri)))
    fake = np.concatenate([a.labels == 0 for a in agiri])
    assert roc_auc_score(fake, cast) > 0.65  # AGIRI fakes carry the cast too
    assert 0.4 < roc_auc_score(fake, grating) < 0.6  # the grating says nothing about AGIRI labels
    present = grating > np.median(grating)
    assert grating[present].mean() > 3 * grating[~present].mean()  # ... though half of AGIRI carries it
