"""`fakedet prepare` and `fakedet make-synthetic`, and the `--data` option other commands share."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fakedet.data.build import prepare
from fakedet.data.decode import RESIZE_METHODS
from fakedet.data.errors import DataError
from fakedet.data.options import PrepareOptions
from fakedet.data.sources import DATASETS, SOURCES
from fakedet.data.synthetic import SIZES, VARIANTS


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="decode CIFAKE, AGIRI and CIFAR-100 once into a memory-mapped cache",
        description=(
            "Decode the datasets into DIR (uint8 N×32×32×3 arrays, labels, source paths) and write DIR/manifest.json. "
            "A dataset without a folder is downloaded with kagglehub at its pinned version: "
            + "; ".join(f"{n}: {s.handle}" for n, s in SOURCES.items())
            + ". Unchanged inputs are never decoded twice; a change of input or option rebuilds what it affects."
        ),
    )
    p.add_argument("--cifake", metavar="PATH", help="CIFAKE folder (train|test/REAL|FAKE)")
    p.add_argument("--agiri", metavar="PATH", help="AGIRI folder (train|test/real|fake)")
    p.add_argument(
        "--cifar100",
        metavar="PATH",
        help="CIFAR-100 python-version folder (pickles train, test, meta; or cifar-100-python/ inside)",
    )
    p.add_argument(
        "--sources",
        metavar="DIR",
        help="a folder holding cifake/, agiri/, cifar100/ (what make-synthetic writes); explicit paths win",
    )
    p.add_argument("--cache", metavar="DIR", required=True, help="the cache directory to write")
    p.add_argument(
        "--only",
        nargs="+",
        choices=DATASETS,
        metavar="NAME",
        help=f"prepare only these ({', '.join(DATASETS)}); others keep their cache entries",
    )
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading a dataset given no folder")
    _add_options(p)
    p.add_argument(
        "--workers", type=int, default=None, help="decode processes (default: all cores; 0: in this process)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_prepare)

    m = subparsers.add_parser(
        "make-synthetic",
        help="write the built-in stand-in datasets (CIFAKE-, CIFAR-100- and AGIRI-like) in their real formats",
        description="Write DIR/cifake, DIR/agiri and DIR/cifar100, deterministically. Not evidence about the real datasets.",
    )
    m.add_argument("dir", metavar="DIR")
    m.add_argument(
        "--size",
        choices=tuple(SIZES),
        default="default",
        help="tiny (tests), small (smoke sweeps), default (the README's ablation), cifake (CIFAKE's counts)",
    )
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--variant",
        choices=VARIANTS,
        default="standard",
        help="standard, or planted: cues of known effect on transfer (a check of the analyses; see STANDIN.md)",
    )
    m.add_argument("--prepare", metavar="CACHE", help="also prepare it into this cache directory")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=_make_synthetic)


def _add_options(p: argparse.ArgumentParser) -> None:
    d = PrepareOptions()
    g = p.add_argument_group("preprocessing and splits (all part of the cache key)")
    g.add_argument(
        "--resize",
        choices=tuple(RESIZE_METHODS),
        default=d.resize,
        help=f"filter for images not 32×32 (default {d.resize}, antialiased; the reference used pil-default)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"share of CIFAKE train held out as cifake_val (default {d.val_fraction})",
    )
    g.add_argument(
        "--agiri-val-size",
        type=int,
        default=d.agiri_val_size,
        help=f"images sampled from AGIRI train as agiri_val (default {d.agiri_val_size})",
    )
    g.add_argument("--split-seed", type=int, default=d.seed, help=f"seed of both held-out splits (default {d.seed})")
    g.add_argument("--agiri-train", action="store_true",
                   help="also decode AGIRI train less agiri_val as agiri_train (to train on AGIRI: train_on = agiri)")
    g.add_argument(
        "--no-cifar100-jpeg",
        dest="cifar100_jpeg",
        action="store_false",
        help="skip the JPEG round-trip copy of CIFAR-100 test",
    )
    g.add_argument(
        "--jpeg-quality",
        type=int,
        default=d.jpeg_quality,
        help="quality of that round trip (default: CIFAKE's REAL files' estimated quality, else 75)",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help=f"decompression-bomb guard, pixels per decoded image (default {d.max_pixels:,})",
    )
    g.add_argument(
        "--jpeg-draft", action="store_true", help="decode large JPEGs at reduced size (faster; changes pixels)"
    )


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    return PrepareOptions(
        resize=args.resize,
        val_fraction=args.val_fraction,
        agiri_val_size=args.agiri_val_size,
        seed=args.split_seed,
        cifar100_jpeg=args.cifar100_jpeg,
        jpeg_quality=args.jpeg_quality,
        max_pixels=args.max_pixels,
        jpeg_draft=args.jpeg_draft,
        agiri_train=args.agiri_train,
    )


def _logging() -> None:
    logger = logging.getLogger("fakedet.data")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _prepare(args: argparse.Namespace) -> int:
    _logging()
    paths = {ds: getattr(args, ds) for ds in DATASETS}
    if args.sources:
        for ds in DATASETS:
            if paths[ds] is None and (Path(args.sources) / ds).is_dir():
                paths[ds] = str(Path(args.sources) / ds)
    try:
        manifest = prepare(
            args.cache,
            **paths,
            only=args.only,
            options=options_from_args(args),
            allow_download=not args.no_download,
            workers=args.workers,
            show_progress=not args.quiet,
        )
    except (DataError, ValueError, OSError) as e:
        return _fail(e)
    print(summary(manifest, args.cache))
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    from fakedet.data.synthetic import make_synthetic

    _logging()
    try:
        out = make_synthetic(args.dir, args.size, args.seed, variant=args.variant, show_progress=not args.quiet)
        variant = "" if args.variant == "standard" else f", {args.variant}"
        print(
            f"stand-in ({args.size}{variant}, seed {args.seed}) in {out}: cifake/, agiri/, cifar100/"
            " — not evidence about the real datasets"
        )
        if args.prepare:
            manifest = prepare(
                args.prepare, **{ds: out / ds for ds in DATASETS}, allow_download=False, show_progress=not args.quiet
            )
            print(summary(manifest, args.prepare))
    except (DataError, ValueError, OSError) as e:
        return _fail(e)
    return 0


def summary(manifest: dict, cache_dir: str | Path) -> str:
    """The table `prepare` prints: per dataset and split, counts, skips, speed; then the sets."""
    rows = [("dataset/split", "real", "fake", "skipped", "ignored", "img/s", "source")]
    for ds, entry in manifest["datasets"].items():
        src = entry["source"]
        origin = "stand-in" if src.get("standin") else src.get("handle", src["origin"])
        for split in ("train", "test"):
            if split not in entry:
                continue
            e = entry[split]
            ips = e.get("images_per_second")
            rows.append(
                (
                    f"{ds}/{split}",
                    str(e["real"]),
                    str(e["fake"]),
                    str(len(e["skipped"])),
                    str(len(e.get("ignored", []))),
                    f"{ips:,.0f}" if ips else "-",
                    origin,
                )
            )
    rows.append(("", "", "", "", "", "", ""))
    rows.append(("set", "real", "fake", "n", "", "", "unit"))
    for name, s in manifest["sets"].items():
        rows.append((name, str(s["real"]), str(s["fake"]), str(s["n"]), "", "", s["unit"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]
    notes = [f"cache {cache_dir}  hash {manifest['cache_hash']}"]
    for ds, entry in manifest["datasets"].items():
        clip = entry.get("train", {}).get("clipped")
        if clip:
            notes.append(f"note: {clip}")
        q = entry.get("jpeg_quality_estimate")
        if q:
            notes.append(f"note: {ds} REAL files look like JPEG quality {q}")
        opts = entry.get("options", {})
        if opts.get("cifar100_jpeg"):
            notes.append(f"note: cifar100_test_jpeg: JPEG quality {opts['jpeg_quality']} ({opts['jpeg_quality_from']})")
    return "\n".join(lines + notes)


# ----------------------------------------------------------------------------------- --data


def add_data_arguments(parser: argparse.ArgumentParser, default: str = "synthetic") -> None:
    """Add `--data synthetic|kaggle|PATH`, `--data-size` and `--cache-root` to a command's parser
    (the same names `fakedet train` uses)."""
    from fakedet.config import default_cache_root
    from fakedet.data.resolve import SPEC_HELP

    g = parser.add_argument_group("data")
    g.add_argument("--data", default=default, metavar="SPEC", help=f"{SPEC_HELP} (default: {default})")
    g.add_argument(
        "--data-size", choices=tuple(SIZES), default="default", help="size of the synthetic stand-in (default: default)"
    )
    g.add_argument(
        "--cache-root",
        default=None,
        metavar="DIR",
        help=f"where prepared data are kept (default: {default_cache_root()})",
    )


def resolve_data_args(args: argparse.Namespace, show_progress: bool = True) -> Path:
    """The prepared cache directory that `add_data_arguments`' options name (preparing it if needed)."""
    from fakedet.config import default_cache_root
    from fakedet.data.resolve import resolve_data

    _logging()
    root = args.cache_root or default_cache_root()
    return resolve_data(args.data, root, size=args.data_size, show_progress=show_progress)
