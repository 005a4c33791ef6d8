"""The in-memory form every dataset takes: uint8 images N×32×32×3 with REAL=1 / FAKE=0 labels.

The data layer writes these into its cache; training, evaluation and sweeps read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fakedet import FAKE, REAL

IMAGE_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class ImageSet:
    """One split of one dataset, decoded.

    A set whose labels are all REAL (CIFAR-100) is scored as a real-only set: real recall
    overall and per content class. Otherwise it is scored as a labelled binary set.
    """

    images: np.ndarray
    """uint8, N×32×32×3, RGB, channel last (may be a read-only memory map)."""
    labels: np.ndarray
    """uint8, N; REAL=1, FAKE=0."""
    name: str = ""
    fine: np.ndarray | None = None
    """Optional fine content labels (CIFAR-100: 100 classes), int, N."""
    coarse: np.ndarray | None = None
    """Optional coarse content labels (CIFAR-100: 20 superclasses), int, N."""
    fine_names: tuple[str, ...] | None = None
    coarse_names: tuple[str, ...] | None = None
    paths: np.ndarray | None = field(default=None, repr=False)
    """Optional source path of each row, relative to the dataset root."""
    masks: np.ndarray | None = field(default=None, repr=False)
    """Optional uint8 N×32×32: each pixel's coverage by the image's focal object (0–255), where the source
    knows it (the stand-in's CIFAKE sets: its renderer draws the object; `fakedet.explain` reads them)."""

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(
                f"ImageSet {self.name!r}: images must be uint8 N×32×32×3, got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"ImageSet {self.name!r}: {len(self.images)} images but labels of shape {self.labels.shape}"
            )
        bad = ~np.isin(self.labels, (REAL, FAKE))
        if bad.any():
            raise ValueError(f"ImageSet {self.name!r}: labels must be REAL=1 or FAKE=0, found {np.unique(self.labels[bad])}")
        if self.masks is not None and self.masks.shape != (len(self.images), *IMAGE_SHAPE[:2]):
            raise ValueError(f"ImageSet {self.name!r}: masks must be N×32×32, got {self.masks.shape}")
        for attr in ("fine", "coarse", "paths"):
            value = getattr(self, attr)
            if value is not None and len(value) != len(self.images):
                raise ValueError(f"ImageSet {self.name!r}: {attr} has {len(value)} rows, images {len(self.images)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def real_only(self) -> bool:
        return len(self) > 0 and bool((self.labels == REAL).all())

    def subset(self, index: np.ndarray, name: str | None = None) -> "ImageSet":
        """Rows `index` (an integer array or boolean mask), materialised in memory."""
        take = lambda a: None if a is None else np.asarray(a[index])  # noqa: E731
        return replace(
            self,
            images=np.ascontiguousarray(self.images[index]),
            labels=np.asarray(self.labels[index]),
            fine=take(self.fine),
            coarse=take(self.coarse),
            paths=take(self.paths),
            masks=take(self.masks),
            name=self.name if name is None else name,
        )

    def counts(self) -> dict[str, int]:
        n_real = int((self.labels == REAL).sum())
        return {"real": n_real, "fake": len(self) - n_real}
