"""Images into the model, on any device: device choice, the preprocessing every forward pass uses,
batched prediction, and the GPU settings that decide how exact a run is.

Preprocessing follows the reference project: uint8 RGB → /255 → ToTensor → Normalize(0.5, 0.5), i.e.
values in [-1, 1]. The model returns a logit; its sigmoid is the probability that an image is REAL.

Training (`fakedet.train`) and `fakedet predict` both go through this module, so a prediction on the
GPU is computed exactly as an evaluation during training is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

# cuBLAS's setting for repeatable results (NVIDIA's cuBLAS docs, "Results reproducibility"; torch's
# "Reproducibility" notes): `torch.use_deterministic_algorithms` refuses cuBLAS calls without it. torch
# reads the variable once, at the process's first cuBLAS call, so it must be set before that.
CUBLAS_DETERMINISTIC = ":4096:8"
CUBLAS_DETERMINISTIC_CONFIGS = (":4096:8", ":16:8")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA where available, else the CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def uint8_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    images = np.ascontiguousarray(images)
    # torch warns on read-only arrays (memory-mapped caches); a batch-sized copy is cheap
    return torch.from_numpy(images if images.flags.writeable else images.copy())


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without making the host wait: on CUDA through pinned memory with a
    non-blocking copy (a plain copy from pageable memory synchronises the host with the GPU)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def preprocess(images_uint8: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 N×H×W×3 (numpy or torch, any device; 32×32 here) → float32 N×3×H×W on `device`, in [-1, 1].

    (x - 127.5) / 127.5 equals the reference's (x/255 - 0.5)/0.5: the subtraction is exact in
    float32 and the one division is correctly rounded, so the result is the float32 rounding of the
    exact value, as the reference's float64 computation cast to float32 is. The uint8 data move to
    the device before the cast (4× less to transfer); the cast also makes the layout contiguous NCHW.
    Each value is computed on its own, so normalising a batch gives the same bits as normalising the
    whole set and taking the batch's rows: training keeps its images as uint8 and normalises per batch.
    """
    x = uint8_tensor(images_uint8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images N×H×W×3, got {x.dtype} {tuple(x.shape)}")
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).sub_(127.5).div_(127.5)


@contextmanager
def ieee_float32() -> Iterator[None]:
    """cuDNN convolutions in IEEE float32 rather than TF32 (torch's default for cuDNN convolutions on
    Ampere and later GPUs), restored on exit.

    TF32 keeps 10 of float32's 23 mantissa bits: a GPU prediction would then differ from the CPU's by
    ~1e-3 in the logit, not the 1e-5 in probability the reference checkpoints are held to. This model is
    too small for TF32 to be faster (a step is a few dozen kernel launches of microseconds each), so
    fakedet always computes in float32. Matrix products (the linear layers) are float32 already under
    torch's default `float32_matmul_precision="highest"`. The flag is torch's `cudnn.allow_tf32`, which
    sets convolutions and RNNs together: setting only the per-operator `cudnn.conv.fp32_precision` would
    leave the two different, and torch then refuses every read of `allow_tf32`.
    """
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def algorithms(deterministic: bool) -> Iterator[None]:
    """The GPU algorithm choice for a training run, restored on exit (the settings are process-wide).

    `deterministic=False` (fast): cuDNN benchmarks its algorithms for each new shape and keeps the
    fastest, some of which add in a varying order (atomics in the backward pass): GPU runs agree only
    to rounding. `deterministic=True`: `torch.use_deterministic_algorithms`, `cudnn.deterministic`, no
    benchmarking, and `CUBLAS_WORKSPACE_CONFIG`: GPU runs repeat bit for bit on the same GPU model and
    software. No effect on CPU results, which are repeatable either way.

    `CUBLAS_WORKSPACE_CONFIG` is set here while CUDA is unused in this process; once CUDA is in use
    torch may have read it already, so it must then come from the environment the process started with.
    """
    if deterministic and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC_CONFIGS:
        if torch.cuda.is_initialized():
            raise RuntimeError(
                f"the deterministic mode needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC} before this process "
                "first uses the GPU, and it has used it already: start the process with that variable set"
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


@contextmanager
def host_sync_allowed(device: torch.device) -> Iterator[None]:
    """Lift `torch.cuda.set_sync_debug_mode` while the enclosed code may wait for the GPU on purpose.

    Training waits for the GPU only while setting up and at evaluation points; it runs those parts in
    here, so that a caller may set the mode to "error" around `train()` and get an error from any
    synchronisation inside the training steps (tests/test_gpu.py does).
    """
    if device.type != "cuda":
        yield
        return
    saved = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(saved)


def predict_logits(
    model: nn.Module,
    images_uint8: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Logits (float32, N) of `model` in eval mode; the model's train/eval mode is restored after.

    `device` is where batches go (default: the device of the model's parameters); the model must
    already be there. Convolutions run in IEEE float32 on every device (see `ieee_float32`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), ieee_float32():
            out = [
                model(preprocess(images_uint8[i : i + batch_size], device)).reshape(-1)
                for i in range(0, len(images_uint8), batch_size)
            ]
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).float().cpu().numpy()


def predict_proba(
    model: nn.Module,
    images_uint8: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """P(REAL) per image: the sigmoid of `predict_logits` (float32, N)."""
    return torch.sigmoid(torch.from_numpy(predict_logits(model, images_uint8, batch_size, device))).numpy()


__all__ = [
    "CUBLAS_DETERMINISTIC",
    "CUBLAS_DETERMINISTIC_CONFIGS",
    "resolve_device",
    "uint8_tensor",
    "to_device",
    "preprocess",
    "ieee_float32",
    "algorithms",
    "host_sync_allowed",
    "predict_logits",
    "predict_proba",
]
