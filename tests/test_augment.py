"""The augmentation axis (`fakedet.augment`): the batched blur and JPEG against scipy and PIL (libjpeg),
the draws from (seed, epoch, step) alone, and the loop's exactness with augmentation on: resume, prefix
sharing and bundles, mirroring tests/test_train.py and tests/test_bundle.py for the plain path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from fakedet.augment import augment_batch, augment_rows, draws, gaussian_blur, jpeg_roundtrip, quality_tables
from fakedet.bundle import SHARED_FIELDS
from fakedet.config import TrainConfig
from fakedet.data import load_splits
from fakedet.train import train, train_models
from test_bundle import assert_same_history, assert_same_state, one_thread  # noqa: F401
from test_train import curves

# Our codec against PIL's libjpeg-turbo (the test below: 100 images of the tiny stand-in's CIFAKE and AGIRI
# test sets), measured over 300 images of each of the `small` stand-in's at qualities 30, 50, 75, 90, 100: mean absolute
# difference 0.47-0.93 grey levels (JPEG itself moves them 4-9 levels at quality <= 75), 99th
# percentile 2-8, largest 5-42. The mean is the codec's agreement; the tail is libjpeg's integer DCT
# rounding a coefficient to the neighbouring step where ours does not: one step of the q30 chroma table
# (99 * 5000/30 / 100 = 165) is up to 165/4 = 41 grey levels at one pixel of its 8x8 block.
JPEG_MEAN_TOL = 1.0
JPEG_P99_TOL = 10
JPEG_MAX_TOL = 48


def pil_roundtrip(images: np.ndarray, quality: int) -> np.ndarray:
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=quality)  # PIL's defaults: 4:2:0, IJG tables, baseline
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return np.stack(out)


@pytest.fixture(scope="module")
def standin_images(tiny_root):
    sets = load_splits(tiny_root / "synthetic-tiny" / "cache")
    return np.concatenate([sets["cifake_test"].images[:60], sets["agiri_test"].images[:40]])


def test_quality_tables_are_libjpegs(standin_images):
    for q in (1, 10, 30, 49, 50, 51, 75, 90, 100):
        buf = io.BytesIO()
        Image.fromarray(standin_images[0]).save(buf, "JPEG", quality=q)
        pil = Image.open(buf).quantization  # natural (row-major) order
        ours = quality_tables(torch.tensor([q]))[0]
        assert ours[0].flatten().tolist() == list(pil[0]) and ours[1].flatten().tolist() == list(pil[1]), q


@pytest.mark.parametrize("quality", [30, 50, 75, 95])
def test_jpeg_roundtrip_agrees_with_pil_within_the_stated_tolerance(standin_images, quality):
    pil = pil_roundtrip(standin_images, quality).astype(int)
    ours = jpeg_roundtrip(torch.from_numpy(standin_images), torch.full((len(standin_images),), quality)).numpy()
    diff = np.abs(ours.astype(int) - pil)
    shown = f"q{quality}: mean {diff.mean():.3f}, p99 {np.percentile(diff, 99):.0f}, max {diff.max()}"
    assert diff.mean() < JPEG_MEAN_TOL and np.percentile(diff, 99) <= JPEG_P99_TOL and diff.max() <= JPEG_MAX_TOL, shown
    # and it is JPEG, not the identity: PIL's own change is several times our difference
    if quality <= 75:
        assert np.abs(standin_images.astype(int) - pil).mean() > 4 * diff.mean(), shown


def test_jpeg_codes_each_image_at_its_own_quality(standin_images):
    images = torch.from_numpy(standin_images[:8])
    quality = torch.tensor([30, 100, 60, 90, 30, 100, 60, 90])
    together = jpeg_roundtrip(images, quality)
    one_by_one = torch.cat([jpeg_roundtrip(images[i : i + 1], quality[i : i + 1]) for i in range(8)])
    assert torch.equal(together, one_by_one)
    lossy = (together.int() - images.int()).abs().float().mean((1, 2, 3))
    assert (lossy[quality == 30] > lossy[quality == 100]).all()


def test_blur_agrees_with_scipy_per_image_sigma(standin_images):
    images = standin_images[:6]
    sigma = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.5, 2.0])
    ours = gaussian_blur(torch.from_numpy(images), sigma, radius=6).numpy().astype(int)
    for i, s in enumerate(sigma.tolist()):
        # scipy's `mirror` is torch's `reflect` padding; truncate at the same radius (6 px)
        want = images[i].astype(float) if s == 0 else gaussian_filter(images[i].astype(float), (s, s, 0), mode="mirror",
                                                                     truncate=6 / s)
        assert np.abs(ours[i] - np.round(want)).max() <= 1, s  # both rounded to grey levels
    assert (ours[0] == images[0]).all()  # sigma 0 is the identity


def test_draws_come_from_seed_epoch_and_step_alone():
    cfg = TrainConfig(augment="blur_jpeg", seed=5)
    a, b = draws(cfg, 3, 7, 64, torch.device("cpu")), draws(cfg, 3, 7, 64, torch.device("cpu"))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("blur", "sigma", "jpeg", "quality"))
    for other in (draws(cfg, 3, 8, 64, torch.device("cpu")), draws(cfg, 4, 7, 64, torch.device("cpu")),
                  draws(TrainConfig(augment="blur_jpeg", seed=6), 3, 7, 64, torch.device("cpu"))):
        assert not torch.equal(a.sigma, other.sigma)
    low, high = cfg.augment_sigma
    assert ((a.sigma >= low) & (a.sigma <= high)).all()
    assert ((a.quality >= 30) & (a.quality <= 100)).all()
    # the probability is per image and per operation: about p of 4096 images each
    many = draws(TrainConfig(augment="blur_jpeg", augment_p=0.1), 0, 0, 4096, torch.device("cpu"))
    assert abs(many.blur.float().mean() - 0.1) < 0.02 and abs(many.jpeg.float().mean() - 0.1) < 0.02


def test_probability_zero_is_the_identity_and_none_returns_the_batch(standin_images):
    images = torch.from_numpy(standin_images[:16])
    assert augment_batch(images, TrainConfig(), 0, 0) is images
    assert torch.equal(augment_batch(images, TrainConfig(augment="blur_jpeg", augment_p=0.0), 0, 0), images)
    changed = augment_batch(images, TrainConfig(augment="blur_jpeg", augment_p=1.0, augment_quality=(30, 30)), 0, 0)
    assert (changed != images).flatten(1).any(1).all()


def test_rows_of_a_bundle_draw_from_their_own_seeds(standin_images):
    images = torch.from_numpy(standin_images)
    labels = torch.arange(len(images), dtype=torch.float32)
    idx = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    cfgs = [TrainConfig(augment="blur_jpeg", augment_p=1.0, augment_sigma=(0.0, 2.0), seed=s) for s in (1, 2)]
    batch, batch_labels, index = augment_rows(images, labels, idx, cfgs, 2, 5)
    assert batch.shape == (8, 32, 32, 3) and torch.equal(batch_labels, labels[idx.reshape(-1)])
    assert torch.equal(index, torch.arange(8).reshape(2, 4))
    for k, cfg in enumerate(cfgs):  # row k is what model k would see alone
        assert torch.equal(batch[index[k]], augment_batch(images[idx[k]], cfg, 2, 5))
    assert not torch.equal(batch[:4], batch[4:])
    assert {"augment", "augment_p", "augment_sigma", "augment_quality"} <= set(SHARED_FIELDS)


def small_cfg(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 16, "device": "cpu", "augment": "blur_jpeg",
                          "augment_sigma": (0.0, 1.5), "eval_at": (0.5, 1, 2), **kw})


def test_augmentation_changes_training(toy):
    data, test = toy(128, 0), toy(64, 1, "cifake_test")
    plain = train(small_cfg(augment="none", epochs=1, eval_at=()), data, {"cifake_test": test})
    augmented = train(small_cfg(epochs=1, eval_at=()), data, {"cifake_test": test})
    assert plain.final["metrics"] != augmented.final["metrics"]


def test_resume_with_augmentation_continues_exactly(toy):
    data, test = toy(128, 0), toy(64, 1, "cifake_test")
    cfg = small_cfg()
    full = train(cfg, data, {"cifake_test": test})
    saved = {}

    def stop_mid_epoch(record, snapshot):
        if record.epoch == 0.5:  # mid-epoch: the resumed run must redraw from (seed, epoch, step)
            saved["state"] = snapshot()
            return True
        return None

    train(cfg, data, {"cifake_test": test}, on_eval=stop_mid_epoch)
    resumed = train(cfg, data, {"cifake_test": test}, resume=saved["state"])
    assert curves(resumed.history) == curves(full.history)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="different config"):
        train(small_cfg(augment_p=0.1), data, resume=saved["state"])


def test_prefix_with_augmentation_equals_the_shorter_run(toy):
    data, test = toy(128, 0), toy(64, 1, "cifake_test")
    long = train(small_cfg(epochs=4, eval_at=(2,)), data, {"cifake_test": test})
    short = train(small_cfg(epochs=2, eval_at=()), data, {"cifake_test": test})
    assert next(h for h in long.history if h["epoch"] == 2)["metrics"] == short.final["metrics"]


def test_a_bundle_with_augmentation_equals_each_model_trained_alone(toy):
    data, test = toy(160, 0), {"cifake_test": toy(64, 1, "cifake_test")}
    cfgs = [small_cfg(epochs=2, eval_at=(1,), seed=s, lr=lr) for s, lr in ((1, 1e-2), (2, 3e-2), (3, 5e-3))]
    solo = [train(cfg, data, test) for cfg in cfgs]
    bundled = train_models(cfgs, data, test)
    for a, b in zip(solo, bundled):
        assert_same_history(a.history, b.history)
        assert_same_state(a.model.state_dict(), b.model.state_dict())
    with pytest.raises(ValueError, match="differ in 'augment_p'"):
        train_models([cfgs[0], small_cfg(epochs=2, eval_at=(1,), augment_p=0.1)], data)


# ---- the known answer on the planted stand-in (fakedet/data/STANDIN.md, "Augmentation on the planted variant") ----
PLANTED_SEEDS = (11, 12, 13, 14)
PLANTED_EPOCHS = 10  # the base CNN at lr 1e-2 has learned the grating by then in every seed measured
# Blur to sigma 1.5 px: the grating's period is 4.8 px (0.21 cycles per pixel), which a Gaussian keeps by
# exp(-2 pi^2 sigma^2 f^2): 85% at Wang et al.'s scaled 0.43 px (no measurable effect: -0.008 AUC over these
# four seeds), 42% at 1 px, 14% at 1.5 px.
PLANTED_AUGMENT = {"augment": "blur_jpeg", "augment_p": 0.5, "augment_sigma": (0.0, 1.5)}


def planted_small(tmp_path_factory):
    """The `small` planted stand-in, prepared once per session (a second call finds its cache)."""
    from fakedet.data import resolve_data

    root = tmp_path_factory.getbasetemp() / "fakedet-data-small-planted"
    return load_splits(resolve_data("synthetic", root, size="small", variant="planted", show_progress=False))


@pytest.fixture(scope="module")
def planted_sets(tmp_path_factory):
    sets = planted_small(tmp_path_factory)
    return sets["cifake_train"], {"agiri_test": sets["agiri_test"]}


@pytest.mark.slow
def test_blur_jpeg_keeps_more_transfer_after_long_training_on_the_planted_standin(planted_sets):
    """Blur and JPEG wash out the faint grating (the CIFAKE-only cue) more than the colour cast (the
    transferable one), so after the grating has taken over the plain model, the augmented one keeps more
    AGIRI-test AUC: the paired difference per seed (same seed, same batches), with a t interval over seeds."""
    from scipy import stats

    train_set, eval_sets = planted_sets
    auc = {}
    for name, extra in (("none", {}), ("blur_jpeg", PLANTED_AUGMENT)):
        for seed in PLANTED_SEEDS:
            cfg = TrainConfig(lr=1e-2, seed=seed, epochs=PLANTED_EPOCHS, eval_at=(4,), device="cpu", **extra)
            history = train(cfg, train_set, eval_sets).history
            auc[name, seed] = [h["metrics"]["agiri_test"]["auc"] for h in history]  # at epochs 4 and 10
    diff = np.array([auc["blur_jpeg", s][-1] - auc["none", s][-1] for s in PLANTED_SEEDS])
    low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    shown = f"AGIRI test AUC at epoch {PLANTED_EPOCHS}, augmented − plain per seed {np.round(diff, 3)}: " \
            f"{diff.mean():+.3f} [95% t CI {low:+.3f}, {high:+.3f}]; curves {auc}"
    # the plant worked: the plain models lost transfer between epoch 4 and the end
    assert np.mean([auc["none", s][0] - auc["none", s][-1] for s in PLANTED_SEEDS]) > 0.05, shown
    assert low > 0, shown
    print(shown)  # the measured figures, shown with `pytest -rP`
