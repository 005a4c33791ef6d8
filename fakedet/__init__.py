"""fakedet: sweeps over small CNN detectors of AI-generated images (CIFAKE, CIFAR-100, AGIRI)."""

__version__ = "0.1.0"

REAL = 1  # the study's label convention: REAL is the positive class
FAKE = 0
