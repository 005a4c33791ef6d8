"""CIFAR-100 from its python-version pickles, read with an unpickler that cannot run code.

torchvision's CIFAR100 class exposes fine labels only and unpickles with the standard (code-running)
unpickler; the study needs the 20 coarse superclasses as well, so the pickles are read here.

Format (https://www.cs.toronto.edu/~kriz/cifar.html): Python 2 pickles of dicts with keys
`data` (uint8 N×3072, each row the 1024 red, then green, then blue values of a 32×32 image, row-major),
`fine_labels`, `coarse_labels` (lists of int), `filenames`; `meta` holds `fine_label_names` and
`coarse_label_names`. Read with `encoding="bytes"` the keys are bytes (b'data'); with "latin1"
(torchvision) they are str. Both are accepted.

Sizes are checked as well as types: a pickle is a program, and a 200-byte one can declare an array
of any shape. numpy's own pickles build every array empty (`_reconstruct(ndarray, (0,), ...)`) and
then fill it from bytes that are in the file, so any other declared shape is refused before it is
allocated; label lists must hold ints, names must be short, and the pixel bytes cannot exceed the
file. A truncated or corrupt file is a one-line LayoutError, not a traceback.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fakedet.data.errors import LayoutError, UnsafePickleError
from fakedet.data.files import Unreadable, open_regular

# MD5s of the Toronto release, as torchvision pins them (torchvision/datasets/cifar.py, CIFAR100).
OFFICIAL_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
MAX_NAME_CHARS = 255  # a file or class name; CIFAR's are ~20 (e.g. "volcano_s_000012.png")


class _NdarrayName:
    """What the name numpy.ndarray stands for in these pickles: numpy passes it to _reconstruct only.
    Called directly it would allocate an array of any declared shape, unfilled: refused."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise UnsafePickleError("refused: a direct numpy.ndarray(...) call (numpy's own pickles never make one)")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()


def _reconstruct(subtype, shape, dtype):  # noqa: ANN001 - pickle protocol signature
    # numpy's array pickles call _reconstruct(ndarray, (0,), b"b") and fill the array from the
    # pickle's bytes (BUILD; numpy checks the byte count). Refuse any other class, whose
    # __setstate__ could be anything, and any other shape, which would allocate before a check.
    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"refused: array reconstruction of {subtype!r} (only numpy.ndarray is admitted)")
    if tuple(shape) != (0,):
        raise UnsafePickleError(
            f"refused: an array declared with shape {tuple(shape)!r} before its data (numpy's pickles declare (0,))"
        )
    return np.ndarray.__new__(np.ndarray, (0,), dtype)


def _codecs_encode(text, encoding="utf-8"):  # noqa: ANN001
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1"); admit that
    # codec only (others, e.g. zlib_codec, are transforms no CIFAR file needs)
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refused: _codecs.encode with encoding {encoding!r} (only latin1 is admitted)")
    return codecs.encode(text, "latin1")


# The dtypes numpy pickles for CIFAR's arrays (uint8 pixels; int64 labels in some re-pickles), and
# the other plain fixed-size numbers. A flexible dtype (void `V`, bytes `S`, str `U`), a structured or
# an object one is refused: `dtype.__setstate__` (the pickle's BUILD) can give a flexible dtype any
# itemsize (one numpy scalar of it is then that many bytes: a 257-byte `meta` peaked at 4.4 GB) and
# any dtype the object flag (its bytes then read as pointers).
_PLAIN_DTYPES = frozenset(f"{kind}{size}" for kind in "uif" for size in (1, 2, 4, 8)
                          if not (kind == "f" and size == 1)) | {"b1"}
_BYTE_ORDERS = ("<", ">", "|", "=")


def _dtype(obj, align=False, copy=False):  # noqa: ANN001
    code = obj.decode("latin1") if isinstance(obj, bytes) else obj
    if not isinstance(code, str) or code.lstrip("".join(_BYTE_ORDERS)) not in _PLAIN_DTYPES or align not in (False, 0):
        raise UnsafePickleError(f"refused: numpy dtype {obj!r} (only plain fixed-size numbers are admitted)")
    return np.dtype(code, False, True)


def _dtype_state_is_plain(dtype: np.dtype, state: object) -> bool:
    """The BUILD state numpy writes for a plain dtype: (3, byte order, None, None, None, -1, -1, 0)."""
    canonical = dtype.__reduce__()[2]
    if not (isinstance(state, tuple) and len(state) == len(canonical)):
        return False
    order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]  # Python 2 pickles read as bytes
    return state[0] == canonical[0] and order in _BYTE_ORDERS and state[2:] == canonical[2:]


def _scalar(dtype, data=None):  # noqa: ANN001
    from numpy._core.multiarray import scalar

    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.str.lstrip("".join(_BYTE_ORDERS)) not in _PLAIN_DTYPES:
        raise UnsafePickleError(f"refused: numpy scalar of dtype {dtype!r}")
    if data is not None and (not isinstance(data, bytes) or len(data) != dtype.itemsize):
        raise UnsafePickleError(f"refused: numpy scalar of dtype {dtype} from {type(data).__name__} data")
    return scalar(dtype, data) if data is not None else scalar(dtype)


def _frombuffer(buf, dtype, shape, order):  # noqa: ANN001
    from numpy._core.numeric import _frombuffer

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"refused: numpy buffer of dtype {dtype!r}")
    return _frombuffer(buf, dtype, shape, order)


# The only globals these files hold: numpy array (and scalar) reconstruction, numpy.dtype, and the
# latin1 codec Python 3 uses for bytes. Containers, str, bytes and ints are plain opcodes.
# numpy 1.x pickles name numpy.core.*, numpy 2.x numpy._core.*: both map to the same callables.
_ADMITTED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that BUILD (an object's `__setstate__`) can be checked too: the C
    one calls it on whatever it built. CIFAR's files are a few large byte strings and lists of ints,
    so its speed costs little (the 150 MB train file reads in well under a second)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def load_build(self) -> None:
        # BUILD on a dtype only as numpy writes it (byte order; nothing that sizes or flags it); on an
        # array only with a plain dtype, whose byte count numpy checks against the bytes in the file
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            if not _dtype_state_is_plain(inst, state):
                raise UnsafePickleError(f"refused: a numpy dtype state {str(state)[:80]} (numpy writes (3, byte order, "
                                        f"None, None, None, -1, -1, 0) for a plain dtype)")
        elif isinstance(inst, np.ndarray):
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
                    and not state[2].hasobject and isinstance(state[4], bytes)):
                raise UnsafePickleError("refused: an array state other than (version, shape, plain dtype, order, bytes)")
        else:
            raise UnsafePickleError(f"refused: setting the state of a {type(inst).__name__} (only numpy's own are admitted)")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):  # noqa: ANN201
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused to unpickle {module}.{name}. CIFAR-100 pickles hold only dicts, "
                f"lists, bytes, ints and numpy arrays; this file asks for something else, so it is not a "
                f"CIFAR-100 file or it has been tampered with. Nothing in it was executed. Replace it with "
                f"the official files ({URL})."
            ) from None

    def persistent_load(self, pid):  # noqa: ANN001, ANN201
        raise UnsafePickleError(f"{self._source}: refused a persistent id in the pickle; nothing was executed")


def safe_load(path: str | Path) -> object:
    """Unpickle a CIFAR pickle; anything but containers, bytes, numbers and arrays raises UnsafePickleError,
    a file that is not a regular file, truncated or corrupt a LayoutError."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            obj = _RestrictedUnpickler(f, str(path)).load()
    except UnsafePickleError as e:
        if str(e).startswith(str(path)):
            raise
        raise UnsafePickleError(f"{path}: {e}") from None
    except Unreadable as e:
        raise LayoutError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a broken pickle raises whatever the opcode it stops at raises
        raise LayoutError(
            f"{path}: not a readable CIFAR-100 pickle, truncated or corrupt ({type(e).__name__}: {e}); "
            f"replace it with the official files ({URL})"
        ) from None
    for arr in _arrays(obj):
        if arr.dtype.hasobject:
            raise UnsafePickleError(f"{path}: refused an object array (CIFAR-100 arrays are uint8)")
    return obj


def _arrays(obj: object, depth: int = 0):  # noqa: ANN202
    if depth > 4:
        return
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj[:16]:  # label lists hold ints; a glance at the head is enough
            yield from _arrays(v, depth + 1)


def _key(d: dict, name: str, path: Path) -> object:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise LayoutError(
        f"{path}: a CIFAR-100 pickle with the key {name!r} was expected; found keys {sorted(map(str, d))}"
    )


def _text(x: bytes | str) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


def _names(seq: object, path: Path, what: str) -> list[str]:
    # each name is checked before it is decoded: a pickle can reference one large string many times
    if not isinstance(seq, (list, tuple)) or not all(
        isinstance(x, (bytes, str)) and len(x) <= MAX_NAME_CHARS for x in seq
    ):
        raise LayoutError(f"{path}: {what} must be a list of names of at most {MAX_NAME_CHARS} characters")
    return [_text(x) for x in seq]


def _labels(seq: object, path: Path, what: str) -> np.ndarray:
    # a list of ints as CIFAR holds them (numpy ints in some re-pickles); an array or nested lists
    # could stand for far more numbers than the file holds
    if not isinstance(seq, (list, tuple)) or not all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in seq
    ):
        raise LayoutError(f"{path}: {what} must be a list of ints, got {type(seq).__name__}")
    return np.asarray(seq, dtype=np.int64)


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    try:
        with open_regular(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except Unreadable as e:
        raise LayoutError(f"{path}: {e}") from None
    return h.hexdigest()


@dataclass
class Cifar100Split:
    images: np.ndarray  # uint8 N×32×32×3, channel last
    fine: np.ndarray  # int16 N
    coarse: np.ndarray  # int16 N
    filenames: list[str]
    md5: str
    official: bool


def read_meta(root: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    path = root / "meta"
    meta = safe_load(path)
    if not isinstance(meta, dict):
        raise LayoutError(
            f"{path}: expected a dict with fine_label_names and coarse_label_names, got {type(meta).__name__}"
        )
    fine = tuple(_names(_key(meta, "fine_label_names", path), path, "fine_label_names"))
    coarse = tuple(_names(_key(meta, "coarse_label_names", path), path, "coarse_label_names"))
    if len(fine) == 0 or len(coarse) == 0:
        raise LayoutError(f"{path}: empty label name lists (fine {len(fine)}, coarse {len(coarse)})")
    return fine, coarse


def read_split(root: Path, split: str) -> Cifar100Split:
    path = root / split
    d = safe_load(path)
    if not isinstance(d, dict):
        raise LayoutError(f"{path}: expected a dict with data, fine_labels, coarse_labels, got {type(d).__name__}")
    data = _key(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise LayoutError(f"{path}: 'data' must be uint8 N×3072 (channel-planar 32×32 RGB), got {got}")
    size = path.stat().st_size
    if data.nbytes > size:  # every pixel is a byte of the file (numpy's pickles store them raw)
        raise LayoutError(f"{path}: 'data' declares {data.nbytes:,} bytes of pixels, the file holds {size:,}")
    fine = _labels(_key(d, "fine_labels", path), path, "fine_labels")
    coarse = _labels(_key(d, "coarse_labels", path), path, "coarse_labels")
    if not (len(fine) == len(coarse) == len(data)):
        raise LayoutError(f"{path}: {len(data)} images but {len(fine)} fine and {len(coarse)} coarse labels")
    names = d.get(b"filenames", d.get("filenames"))
    filenames = _names(names, path, "filenames") if names is not None else []
    if len(filenames) != len(data):
        filenames = [""] * len(data)
    md5 = md5_of(path)
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Cifar100Split(
        images, fine.astype(np.int16), coarse.astype(np.int16), filenames, md5, md5 == OFFICIAL_MD5.get(split)
    )
