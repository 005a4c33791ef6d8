"""`PrepareOptions`: every preprocessing and split choice of `fakedet prepare`, with its defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fakedet.data.decode import DecodeOptions


@dataclass(frozen=True)
class PrepareOptions:
    """Every preprocessing and split choice; all of it is in the cache key and the manifest."""

    resize: str = "bilinear"
    """Filter for images that are not 32×32 (fakedet.data.decode.RESIZE_METHODS). The reference used
    PIL's default resize: pass "pil-default" to reproduce it."""
    val_fraction: float = 0.1
    """Share of CIFAKE train held out (stratified) as cifake_val."""
    agiri_val_size: int = 2000
    """Images sampled (stratified) from AGIRI train as agiri_val; clipped to what exists, recorded."""
    seed: int = 0
    """Seed of both held-out splits (not of training)."""
    cifar100_jpeg: bool = True
    """Also write cifar100_test_jpeg: CIFAR-100 test through one JPEG encode/decode. CIFAKE's real
    images are JPEG files, CIFAR-100's pickles raw pixels: the copy separates a content shift from
    a compression shift."""
    jpeg_quality: int | None = None
    """Quality of that round trip (Pillow's encoder, 4:2:0 chroma subsampling). None: the quality
    estimated from CIFAKE's REAL files (from their quantisation tables) when CIFAKE is in the same
    cache, else 75 (Pillow's default); CIFAKE's encoder settings are not documented."""
    max_pixels: int = DecodeOptions.max_pixels
    jpeg_draft: bool = False
    agiri_train: bool = False
    """Also decode AGIRI train, less the agiri_val rows, as agiri_train: the training set of `train_on =
    "agiri"` and `"cifake+agiri"`. Off by default: the study trains on CIFAKE alone, and the real AGIRI
    train holds about 48,000 large images (about 3 minutes of decoding on 2 cores at 260 images/s)."""

    def __post_init__(self) -> None:
        DecodeOptions(self.resize, self.max_pixels, jpeg_draft=self.jpeg_draft)  # validates
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.agiri_val_size < 0:
            raise ValueError(f"agiri_val_size must be >= 0, got {self.agiri_val_size}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    def record(self) -> dict:
        """The options as the manifest records them: `agiri_train` only where it is on, so that a cache
        prepared before the option existed is current as it is (also on a read-only store)."""
        d = asdict(self)
        if not d["agiri_train"]:
            del d["agiri_train"]
        return d

    def decode(self) -> DecodeOptions:
        return DecodeOptions(resize=self.resize, max_pixels=self.max_pixels, jpeg_draft=self.jpeg_draft)
