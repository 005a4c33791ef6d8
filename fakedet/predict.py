"""`fakedet predict`: score image files with a trained model.

The preprocessing and batched prediction it uses are the library's (`fakedet.preprocess`), the same
that evaluation during training uses.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch.nn as nn

from fakedet.preprocess import predict_proba, resolve_device


def add_predict_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fakedet.data.decode import RESIZE_METHODS, DecodeOptions
    from fakedet.models import PLACEMENTS

    p = subparsers.add_parser(
        "predict",
        help="score image files with a trained model: CSV of path,p_real on stdout",
        description="Score image files of any size and mode, decoded to 32×32 RGB as the data layer decodes "
        "datasets. Prints CSV `path,p_real` to stdout, one row per readable image, in the order given. "
        "Unreadable images are reported on stderr and skipped; the exit code is then 1.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, metavar="PATH", help="a fakedet checkpoint (written by `fakedet train`)")
    which.add_argument(
        "--reference-checkpoint",
        type=Path,
        metavar="PATH",
        help="one of the study's published state dicts (base_model.pth, mini_model.pth, SRM_model.pth); needs --srm",
    )
    p.add_argument(
        "--srm",
        choices=list(PLACEMENTS),
        help="SRM placement of a --reference-checkpoint: none (base_model, mini_model) or pool1 (SRM_model); "
        "the files do not record it",
    )
    p.add_argument(
        "--resize",
        choices=list(RESIZE_METHODS),
        default=DecodeOptions.resize,
        help="filter for images that are not 32×32; use the one the model's training data were prepared with "
        f"(default: {DecodeOptions.resize})",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images decoded and scored at a time (default: 256)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.set_defaults(func=run_predict)
    return p


def _fail(message: str) -> int:
    print(f"fakedet predict: error: {message}", file=sys.stderr)
    return 2


def _load_model(args: argparse.Namespace) -> nn.Module:
    from fakedet.models import load_checkpoint, load_reference_checkpoint

    if args.reference_checkpoint is not None:
        return load_reference_checkpoint(args.reference_checkpoint, args.srm)
    return load_checkpoint(args.checkpoint)[0]


def run_predict(args: argparse.Namespace) -> int:
    from fakedet.data.decode import DecodeOptions, Skip, decode_image, read_image_file

    path = args.checkpoint if args.checkpoint is not None else args.reference_checkpoint
    if args.reference_checkpoint is not None and args.srm is None:
        return _fail("--reference-checkpoint needs --srm: none for base_model/mini_model, pool1 for SRM_model")
    if args.checkpoint is not None and args.srm is not None:
        return _fail("--srm applies to --reference-checkpoint only; a fakedet checkpoint records its own placement")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if not path.is_file():
        return _fail(f"checkpoint not found: {path}")
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        return _fail(str(e))
    try:
        model = _load_model(args)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a file of the wrong kind
        return _fail(f"cannot load {path}: {e}")
    model.to(device)
    opts = DecodeOptions(resize=args.resize)

    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["path", "p_real"])
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        names, arrays = [], []
        for name in args.images[start : start + args.batch_size]:
            try:  # regular files only, size-bounded: a FIFO or /dev/zero is refused, not read
                arrays.append(decode_image(read_image_file(name, opts), opts))
            except Skip as e:
                failed += 1
                print(f"fakedet predict: {name}: {e}", file=sys.stderr)
                continue
            names.append(name)
        if names:
            p_real = predict_proba(model, np.stack(arrays), args.batch_size, device)
            # 9 significant digits round-trip a float32 exactly
            out.writerows((name, f"{p:.9g}") for name, p in zip(names, p_real))
            sys.stdout.flush()
    if failed:
        print(f"fakedet predict: {failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0
