from __future__ import annotations

import numpy as np
import pytest

from fakedet.arrays import ImageSet


def toy_set(n: int, seed: int = 0, name: str = "toy", real_only: bool = False) -> ImageSet:
    """Images whose class is learnable in a few steps: REAL images are darker on average."""
    rng = np.random.default_rng(seed)
    labels = np.ones(n, np.uint8) if real_only else (np.arange(n) % 2).astype(np.uint8)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[labels == 1] //= 2
    return ImageSet(images, labels, name=name)


@pytest.fixture
def toy():
    return toy_set
