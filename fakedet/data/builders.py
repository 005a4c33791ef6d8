"""The units of each dataset, and the manifest entry each dataset gets. Units are:

    cifake-train   CIFAKE train decoded      key: files (path, size, mtime) + decode options
    cifake-split   cifake_train, cifake_val  key: cifake-train + val_fraction + seed
    cifake-test    cifake_test               key: files + decode options
    agiri-val      agiri_val, a sample of AGIRI train (only the sample is decoded)
                                             key: train files + decode options + size + seed
    agiri-train    agiri_train, AGIRI train less the agiri_val rows (only with `agiri_train`)
                                             key: train files + decode options + agiri-val's key
    agiri-test     agiri_test                key: files + decode options
    cifar100-test  cifar100_test             key: the pickles (path, size, mtime)
    cifar100-jpeg  cifar100_test_jpeg        key: cifar100-test + JPEG quality
    cifar100-train counts only (not cached: the study uses CIFAR-100 test alone)

So changing the validation fraction re-splits without decoding, and an unchanged input never
decodes twice. Each unit also records a content digest (sha1 of every input file's bytes, plus the
options); the manifest's `cache_hash` combines those of its sets.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from fakedet import FAKE, REAL
from fakedet.data import cifar100 as c100
from fakedet.data.cache import FORMAT
from fakedet.data.decode import SIZE, decode_files
from fakedet.data.errors import LayoutError
from fakedet.data.jpeg import folder_jpeg_quality, jpeg_round_trip
from fakedet.data.options import PrepareOptions
from fakedet.data.sources import list_split, stat_fingerprint
from fakedet.data.splits import holdout, per_class_quota, sample_order
from fakedet.data.synthetic import DELIBERATE_CORRUPT, cifake_name, mask_file
from fakedet.data.units import UnitStore, content_digest, digest, save_set

# Bump when a code change alters decoded pixels or split rows: every unit is rebuilt.
DECODE_VERSION = 1
SPLIT_VERSION = 1

Made = list[tuple[str, dict, dict]]  # (unit folder, unit info, extra manifest fields of its sets)


def _skips(relpaths: list[str], skipped: list[tuple[int, str]]) -> list[dict]:
    return [{"path": relpaths[i], "reason": why} for i, why in skipped]


def _mask_sources(ds: str, root: Path, split: str) -> list[str]:
    """The stand-in's object-mask files of a CIFAKE split (`synthetic.mask_file`), where it wrote them."""
    if ds != "cifake":
        return []
    files = [mask_file(split, label) for label in ("REAL", "FAKE")]
    return files if all((root / f).is_file() for f in files) else []


def _masks_for(root: Path, split: str, kept_paths: list[str], images: np.ndarray) -> np.ndarray | None:
    """The object masks of the decoded rows, in their order, or None where a row has none (or the images
    are not the masks' 32×32)."""
    if images.shape[1:3] != (32, 32):
        return None
    where: dict[str, tuple[np.ndarray, int]] = {}
    for label in ("REAL", "FAKE"):
        masks = np.load(root / mask_file(split, label), mmap_mode="r")
        where.update({f"{split}/{label}/{cifake_name(i, label)}": (masks, i) for i in range(len(masks))})
    if not all(p in where for p in kept_paths):
        return None
    return np.stack([where[p][0][where[p][1]] for p in kept_paths]) if kept_paths else np.zeros((0, 32, 32), np.uint8)


def image_folder_unit(
    store: UnitStore, ds: str, root: Path, split: str, opts: PrepareOptions, workers: int | None, show_progress: bool,
    standin: bool = False,
) -> tuple[str, dict]:
    listing = list_split(ds, root, split)
    if not listing.relpaths:
        raise LayoutError(
            f"{ds}: {root}/{split} holds no image files (looked for .jpg, .png, ... under its class folders)"
        )
    dec = opts.decode()
    mask_files = _mask_sources(ds, root, split)
    # a source without object masks keeps the key it always had
    key = digest(FORMAT, DECODE_VERSION, ds, split, stat_fingerprint(root, listing.relpaths), dec.to_dict(),
                 *([stat_fingerprint(root, mask_files)] if mask_files else []))
    set_name = f"{ds}_{split}" if ds != "cifake" or split == "test" else "cifake_trainval"

    def build(tmp: Path) -> dict:
        d = decode_files(
            root, listing.relpaths, dec, workers=workers, desc=f"{ds}/{split}", show_progress=show_progress
        )
        kept_paths = [listing.relpaths[i] for i in d.kept]
        masks = _masks_for(root, split, kept_paths, d.images) if mask_files else None
        extra = {} if masks is None else {"masks": masks}
        counts = save_set(tmp, set_name, d.images, listing.labels[d.kept], kept_paths, **extra)
        return {
            "sets": {set_name: counts},
            "files": len(listing.relpaths),
            "skipped": _skips(listing.relpaths, d.skipped),
            "ignored": listing.ignored,
            "content": digest(content_digest(listing.relpaths, d.digests), dec.to_dict(), DECODE_VERSION),
            "decode_seconds": round(d.seconds, 3),
            "images_per_second": round(len(listing.relpaths) / max(d.seconds, 1e-9), 1),
        }

    rel, info = store.unit(f"{ds}-{split}", key, build)
    store.warn_skips(f"{ds}/{split}", info, DELIBERATE_CORRUPT if standin else ())
    return rel, info


def agiri_val_unit(
    store: UnitStore, root: Path, opts: PrepareOptions, workers: int | None, show_progress: bool, standin: bool = False
) -> tuple[str, dict]:
    listing = list_split("agiri", root, "train")
    dec = opts.decode()
    key = digest(
        FORMAT,
        DECODE_VERSION,
        SPLIT_VERSION,
        "agiri-val",
        stat_fingerprint(root, listing.relpaths),
        dec.to_dict(),
        opts.agiri_val_size,
        opts.seed,
    )

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        orders = sample_order(listing.labels, opts.seed)
        quotas = per_class_quota(opts.agiri_val_size, len(orders))
        chosen: list[int] = []
        images: list[np.ndarray] = []
        skipped: list[tuple[int, str]] = []
        digests: dict[int, str] = {}
        for order, quota in zip(orders, quotas):
            got, pos = 0, 0
            # decode the first `quota` of the seeded order; replace each corrupt file by the next one
            while got < quota and pos < len(order):
                take = order[pos : pos + (quota - got)]
                pos += len(take)
                rels = [listing.relpaths[i] for i in take]
                d = decode_files(
                    root, rels, dec, workers=workers, desc="agiri/train (val sample)", show_progress=show_progress
                )
                chosen += [int(take[k]) for k in d.kept]
                images.append(np.array(d.images))
                skipped += [(int(take[k]), why) for k, why in d.skipped]
                digests.update({int(i): s for i, s in zip(take, d.digests)})
                got += len(d.kept)
        order_out = np.argsort(chosen, kind="stable")  # rows in path order, like every other set
        rows = np.asarray(chosen, np.int64)[order_out]
        imgs = np.concatenate(images)[order_out] if images else np.zeros((0, SIZE, SIZE, 3), np.uint8)
        counts = save_set(tmp, "agiri_val", imgs, listing.labels[rows], [listing.relpaths[i] for i in rows])
        seen = sorted(digests)
        used = len(rows)
        available = {"real": int((listing.labels == REAL).sum()), "fake": int((listing.labels == FAKE).sum())}
        clip = None
        if used < opts.agiri_val_size:
            clip = (
                f"agiri_val_size {opts.agiri_val_size} clipped to {used}: AGIRI train holds {len(listing.relpaths)} "
                f"image files ({available['real']} real, {available['fake']} fake), {len(skipped)} of those tried could not be decoded"
            )
            # the stand-in is smaller than the real AGIRI by design: a clip there is expected
            store.say(logging.WARNING, "%s%s", clip, "; as intended for the stand-in, smaller than the real AGIRI, "
                      "its undecodable files broken on purpose" if standin else "")
        seconds = time.perf_counter() - t0
        return {
            "sets": {"agiri_val": counts},
            "files": len(listing.relpaths),
            "available": available,
            "tried": len(seen),
            "requested": opts.agiri_val_size,
            "clipped": clip,
            "skipped": _skips(listing.relpaths, sorted(skipped)),
            "ignored": listing.ignored,
            "content": digest(
                content_digest([listing.relpaths[i] for i in seen], [digests[i] for i in seen]),
                dec.to_dict(),
                DECODE_VERSION,
                SPLIT_VERSION,
                opts.agiri_val_size,
                opts.seed,
            ),
            "decode_seconds": round(seconds, 3),
            "images_per_second": round(len(seen) / max(seconds, 1e-9), 1),
        }

    rel, info = store.unit("agiri-val", key, build)
    store.warn_skips("agiri/train (val sample)", info, DELIBERATE_CORRUPT if standin else ())
    return rel, info


def agiri_train_unit(
    store: UnitStore, root: Path, val_rel: str, val: dict, opts: PrepareOptions, workers: int | None, show_progress: bool,
    standin: bool = False,
) -> tuple[str, dict]:
    """AGIRI train at 32 px without the rows of agiri_val (`val_rel`, `val`: its unit), which stays held out:
    the training set of `train_on = "agiri"`. Decodes every train file but the sample's."""
    listing = list_split("agiri", root, "train")
    dec = opts.decode()
    key = digest(FORMAT, DECODE_VERSION, SPLIT_VERSION, "agiri-train", stat_fingerprint(root, listing.relpaths),
                 dec.to_dict(), val["key"])

    def build(tmp: Path) -> dict:
        held = set(str(p) for p in store.read(val_rel, "agiri_val")[2])
        rows = [i for i, rel in enumerate(listing.relpaths) if rel not in held]
        rels = [listing.relpaths[i] for i in rows]
        d = decode_files(root, rels, dec, workers=workers, desc="agiri/train (less agiri_val)", show_progress=show_progress)
        kept = [rows[k] for k in d.kept]
        counts = save_set(tmp, "agiri_train", np.asarray(d.images).reshape(-1, SIZE, SIZE, 3), listing.labels[kept],
                          [listing.relpaths[i] for i in kept])
        return {
            "sets": {"agiri_train": counts},
            "files": len(rels),
            "held_out": len(held),
            "skipped": _skips(rels, d.skipped),
            "ignored": listing.ignored,
            "content": digest(content_digest(rels, d.digests), dec.to_dict(), DECODE_VERSION, SPLIT_VERSION, val["content"]),
            "decode_seconds": round(d.seconds, 3),
            "images_per_second": round(len(rels) / max(d.seconds, 1e-9), 1),
        }

    rel, info = store.unit("agiri-train", key, build)
    store.warn_skips("agiri/train (less agiri_val)", info, DELIBERATE_CORRUPT if standin else ())
    return rel, info


def cifake_split_unit(store: UnitStore, parent_rel: str, parent: dict, opts: PrepareOptions) -> tuple[str, dict]:
    key = digest(FORMAT, SPLIT_VERSION, parent["key"], opts.val_fraction, opts.seed)

    def build(tmp: Path) -> dict:
        images, labels, paths = store.read(parent_rel, "cifake_trainval")
        keep, held = holdout(labels, opts.val_fraction, opts.seed)
        mask_path = store.root / parent_rel / "cifake_trainval.masks.npy"
        masks = np.load(mask_path, mmap_mode="r") if mask_path.is_file() else None
        part = lambda rows: {} if masks is None else {"masks": masks[rows]}  # noqa: E731
        return {
            "sets": {
                "cifake_train": save_set(tmp, "cifake_train", images[keep], labels[keep], paths[keep], **part(keep)),
                "cifake_val": save_set(tmp, "cifake_val", images[held], labels[held], paths[held], **part(held)),
            },
            "content": digest(parent["content"], SPLIT_VERSION, opts.val_fraction, opts.seed),
        }

    return store.unit("cifake-split", key, build)


def cifar100_units(
    store: UnitStore, root: Path, opts: PrepareOptions, standin: bool, quality: int
) -> tuple[list[tuple[str, dict]], dict]:
    files = [f for f in ("test", "meta", "train") if (root / f).is_file()]
    key = digest(FORMAT, DECODE_VERSION, "cifar100-test", stat_fingerprint(root, ["test", "meta"]))

    def build(tmp: Path) -> dict:
        fine_names, coarse_names = c100.read_meta(root)
        split = c100.read_split(root, "test")
        if split.fine.max(initial=0) >= len(fine_names) or split.coarse.max(initial=0) >= len(coarse_names):
            raise LayoutError(
                f"cifar100: {root}/test has labels beyond the {len(fine_names)} fine / {len(coarse_names)} coarse names in meta"
            )
        paths = [f"test#{i}:{fn}" if fn else f"test#{i}" for i, fn in enumerate(split.filenames)]
        labels = np.full(len(split.images), REAL, np.uint8)
        counts = save_set(tmp, "cifar100_test", split.images, labels, paths, fine=split.fine, coarse=split.coarse)
        md5 = {"test": split.md5, "meta": c100.md5_of(root / "meta")}
        return {
            "sets": {"cifar100_test": counts},
            "fine_names": list(fine_names),
            "coarse_names": list(coarse_names),
            "md5": md5,
            "skipped": [],
            "content": digest(md5, DECODE_VERSION),
        }

    units = [store.unit("cifar100-test", key, build)]
    test_rel, test_info = units[0]
    if opts.cifar100_jpeg:
        jkey = digest(FORMAT, DECODE_VERSION, "cifar100-jpeg", test_info["key"], quality)

        def build_jpeg(tmp: Path) -> dict:
            images, labels, paths = store.read(test_rel, "cifar100_test")
            folder = store.root / test_rel
            extra = {k: np.load(folder / f"cifar100_test.{k}.npy") for k in ("fine", "coarse")}
            counts = save_set(tmp, "cifar100_test_jpeg", jpeg_round_trip(images, quality), labels, paths, **extra)
            return {
                "sets": {"cifar100_test_jpeg": counts},
                "jpeg_quality": quality,
                "content": digest(test_info["content"], quality),
            }

        units.append(store.unit("cifar100-jpeg", jkey, build_jpeg))

    md5_report = {}
    for f in ("test", "meta"):
        got = test_info["md5"][f]
        md5_report[f] = {"md5": got, "official": got == c100.OFFICIAL_MD5[f]}
    if "train" in files:
        # counts only, read through the same safe reader; cached as a unit so it is read once
        tkey = digest(FORMAT, "cifar100-train", stat_fingerprint(root, ["train"]))

        def build_train(tmp: Path) -> dict:
            split = c100.read_split(root, "train")
            return {"sets": {}, "count": len(split.images), "md5": split.md5, "content": split.md5}

        train_rel, train_info = store.unit("cifar100-train", tkey, build_train)
        units.append((train_rel, train_info))
        md5_report["train"] = {"md5": train_info["md5"], "official": train_info["md5"] == c100.OFFICIAL_MD5["train"]}
    differ = [f for f, r in md5_report.items() if not r["official"]]
    if differ and not standin:
        store.say(
            logging.WARNING,
            "cifar100: the MD5 of %s differs from the official Toronto release (%s): these are not the official "
            "files (a mirror may have re-pickled them). They are read anyway; the manifest records both MD5s.",
            ", ".join(differ),
            ", ".join(f"{f} {md5_report[f]['md5']} vs {c100.OFFICIAL_MD5[f]}" for f in differ),
        )
    for f in differ:
        md5_report[f]["expected"] = c100.OFFICIAL_MD5[f]
    return units, md5_report


def image_folder_entry(
    store: UnitStore, ds: str, root: Path, options: PrepareOptions, workers: int | None, show_progress: bool,
    standin: bool = False,
) -> tuple[dict, Made]:
    """CIFAKE or AGIRI: the manifest entry's fields, and the units made (`standin`: the source is the
    built-in stand-in, whose broken files are deliberate)."""
    entry: dict = {}
    made: Made = []
    if ds == "cifake":
        tr_rel, tr = image_folder_unit(store, ds, root, "train", options, workers, show_progress, standin)
        made += [(tr_rel, tr, {}), (*cifake_split_unit(store, tr_rel, tr, options), {})]
        entry["jpeg_quality_estimate"] = folder_jpeg_quality(root / "train" / "REAL")
        entry["options"] = {
            "decode": options.decode().to_dict(),
            "val_fraction": options.val_fraction,
            "seed": options.seed,
        }
        train_set = "cifake_trainval"
    else:
        tr_rel, tr = agiri_val_unit(store, root, options, workers, show_progress, standin)
        made.append((tr_rel, tr, {}))
        entry["options"] = {
            "decode": options.decode().to_dict(),
            "agiri_val_size": options.agiri_val_size,
            "seed": options.seed,
        }
        if options.agiri_train:
            at_rel, at = agiri_train_unit(store, root, tr_rel, tr, options, workers, show_progress, standin)
            made.append((at_rel, at, {}))
            counts = at["sets"]["agiri_train"]
            entry["options"]["agiri_train"] = True
            entry["agiri_train"] = {"real": counts["real"], "fake": counts["fake"], "skipped": at["skipped"],
                                    "files": at["files"], "held_out_as_agiri_val": at["held_out"],
                                    "decode_seconds": at["decode_seconds"]}
        train_set = "agiri_val"
    te_rel, te = image_folder_unit(store, ds, root, "test", options, workers, show_progress, standin)
    made.append((te_rel, te, {}))
    for split, info, set_name in (("train", tr, train_set), ("test", te, f"{ds}_test")):
        counts = info["sets"][set_name]
        entry[split] = {
            "real": counts["real"],
            "fake": counts["fake"],
            "skipped": info["skipped"],
            "ignored": info["ignored"],
            "files": info["files"],
            "decode_seconds": info["decode_seconds"],
            "images_per_second": info["images_per_second"],
        }
    if ds == "agiri":
        entry["train"].update(
            note="only the agiri_val sample is decoded; counts are of that sample",
            available=tr["available"],
            requested=tr["requested"],
            clipped=tr["clipped"],
        )
    return entry, made


def cifar100_entry(
    store: UnitStore, root: Path, options: PrepareOptions, standin: bool, quality: int, why: str
) -> tuple[dict, Made]:
    unit_list, md5 = cifar100_units(store, root, options, standin, quality)
    test_info = unit_list[0][1]
    names = {"fine_names": test_info["fine_names"], "coarse_names": test_info["coarse_names"]}
    counts = test_info["sets"]["cifar100_test"]
    entry: dict = {"test": {"real": counts["real"], "fake": 0, "skipped": []}}
    train = next((i for _, i in unit_list if i["unit"] == "cifar100-train"), None)
    if train:
        entry["train"] = {
            "real": train["count"],
            "fake": 0,
            "skipped": [],
            "note": "counted, not cached: the study uses CIFAR-100 test",
        }
    entry["md5"] = md5
    entry["n_fine"], entry["n_coarse"] = len(names["fine_names"]), len(names["coarse_names"])
    entry["options"] = {
        "cifar100_jpeg": options.cifar100_jpeg,
        "jpeg_quality": quality if options.cifar100_jpeg else None,
        "jpeg_quality_from": why,
    }
    return entry, [(rel, info, names) for rel, info in unit_list]
