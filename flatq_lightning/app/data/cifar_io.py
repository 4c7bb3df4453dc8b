"""Reading CIFAR-10/100 into uint8 arrays, once: a JPEG ImageFolder zip, the same layout extracted, or
torchvision's download folder (its pickles read without executing code), cached as ``.npz``."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ...utils.progress import progress, status
from .base import (
    DataNotFoundError,
    default_cache_dir,
    resolve_path,
)

__all__ = ["CIFAR_STATS", "IMAGE_EXTS", "load_cifar_arrays"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: per-channel mean and std of the training images (scaled to [0, 1])
CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_TV_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CACHE_VERSION = 1
_SPLITS = ("train", "test")


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL reports broken files as these
        raise ValueError(f"{where}: not a readable image ({type(err).__name__}: {err})") from None
    if arr.shape != (32, 32, 3):
        raise ValueError(f"{where}: expected a 32x32 RGB image, got shape {arr.shape}")
    return arr


def _split_and_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """``(split, class)`` for a path like ``cifar10/train/cat/0001.jpg``; None for anything else."""
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_EXTS):
        return None
    split, cls = parts[-3], parts[-2]
    return (split, cls) if split in _SPLITS else None


def _assemble(
    entries: Iterable[tuple[str, str, str]], read: Callable[[str], bytes], source: str, key: str
) -> dict[str, np.ndarray]:
    """Decode ``(split, class, member)`` entries into arrays; classes sorted by name (ImageFolder order)."""
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in _SPLITS}
    for split, cls, member in entries:
        by_split[split].append((cls, member))
    for s in _SPLITS:
        if not by_split[s]:
            raise DataNotFoundError(
                f"{key}: {source} has no images under '{s}/<class>/' (expected the ImageFolder layout "
                "[<top>/]train/<class>/*.jpg and [<top>/]test/<class>/*.jpg)"
            )
    classes = sorted({c for c, _ in by_split["train"]})
    extra = sorted({c for c, _ in by_split["test"]} - set(classes))
    if extra:
        raise ValueError(f"{source}: test classes {extra} do not appear in the training split")
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}

    for s in _SPLITS:
        items = sorted(by_split[s], key=lambda t: (index[t[0]], t[1]))
        x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
        for i, (_, member) in enumerate(progress(items, f"decoding {s} images", unit="images")):
            try:
                data = read(member)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
                raise ValueError(f"{source}: cannot read member {member!r} (corrupt archive? {type(err).__name__}: {err})") from None
            x[i] = _decode(data, f"{source}:{member}")
        out[f"x_{s}"] = x
        out[f"y_{s}"] = np.array([index[c] for c, _ in items], dtype=np.int64)
    return out


def _read_zip(path: Path, key: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        entries = []
        for name in zf.namelist():
            sc = _split_and_class(tuple(p for p in name.split("/") if p))
            if sc is not None:
                entries.append((sc[0], sc[1], name))
        return _assemble(entries, zf.read, str(path), key)


def _imagefolder_root(path: Path) -> Path | None:
    if (path / "train").is_dir() and (path / "test").is_dir():
        return path
    subs = [d for d in path.iterdir() if d.is_dir()] if path.is_dir() else []
    for d in subs:
        if (d / "train").is_dir() and (d / "test").is_dir():
            return d
    return None


def _read_folder(root: Path, key: str) -> dict[str, np.ndarray]:
    entries = []
    for s in _SPLITS:
        for cls_dir in sorted(d for d in (root / s).iterdir() if d.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    entries.append((s, cls_dir.name, str(f)))
    return _assemble(entries, lambda m: Path(m).read_bytes(), str(root), key)


def _torchvision_dir(path: Path, dataset: str) -> Path | None:
    name = _TV_DIRS[dataset]
    for d in (path, path / name):
        if d.is_dir() and d.name == name:
            return d
    return None


def _plain_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for the unpickler, refusing object dtypes (their arrays would unpickle arbitrary objects)."""
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dt} is not allowed in a CIFAR batch file")
    return dt


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only plain data: dicts, lists, tuples, bytes, str, numbers and numeric numpy arrays.

    A CIFAR batch file is untrusted input; ``pickle.load`` would run whatever a crafted file's ``__reduce__``
    names (``os.system``...). Any other global is refused with ``pickle.UnpicklingError``.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
        ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
        ("numpy.core.numeric", "_frombuffer"): "frombuffer",
        ("numpy._core.numeric", "_frombuffer"): "frombuffer",
        ("numpy", "ndarray"): "ndarray",
        ("numpy", "dtype"): "dtype",
        ("_codecs", "encode"): "encode",
    }

    def find_class(self, module: str, name: str) -> Any:
        kind = self._ALLOWED.get((module, name))
        if kind == "reconstruct":
            return _reconstruct_array
        if kind == "frombuffer":
            return _array_from_buffer
        if kind == "ndarray":
            return np.ndarray
        if kind == "dtype":
            return _plain_dtype
        if kind == "encode":
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR batch file may hold only arrays, lists, dicts, bytes, "
            "str and numbers (is the file corrupt or crafted?)"
        )


def _reconstruct_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"only plain numpy arrays are allowed in a CIFAR batch file, got {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(dtype))


def _array_from_buffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's pickle-protocol-5 array constructor, for plain dtypes only."""
    dt = _plain_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise pickle.UnpicklingError(f"an array buffer must be bytes, got {type(buf).__name__}")
    return np.frombuffer(buf, dtype=dt).reshape(shape, order="F" if order == "F" else "C").copy()


def _unpickle(f: Path) -> dict[bytes, Any]:
    """Read one torchvision CIFAR batch file with :class:`_ArrayUnpickler` (no code from the file runs)."""
    with open(f, "rb") as fh:
        try:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{f}: not a CIFAR batch file: {err}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
            raise ValueError(f"{f}: not a readable CIFAR batch file ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{f}: not a CIFAR batch file (holds a {type(obj).__name__}, expected a dict)")
    return obj


def _read_torchvision(d: Path, dataset: str) -> dict[str, np.ndarray]:
    if dataset == "cifar10":
        files = {"train": [d / f"data_batch_{i}" for i in range(1, 6)], "test": [d / "test_batch"]}
        label_key, meta_file, names_key = b"labels", d / "batches.meta", b"label_names"
    else:
        files = {"train": [d / "train"], "test": [d / "test"]}
        label_key, meta_file, names_key = b"fine_labels", d / "meta", b"fine_label_names"
    out: dict[str, np.ndarray] = {}
    for s, fs in files.items():
        xs, ys = [], []
        for f in fs:
            if not f.exists():
                raise DataNotFoundError(f"torchvision CIFAR folder {d} is incomplete: {f.name} is missing")
            b = _unpickle(f)
            xs.append(np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(b[label_key], dtype=np.int64))
        out[f"x_{s}"] = np.ascontiguousarray(np.concatenate(xs))
        out[f"y_{s}"] = np.concatenate(ys)
    n = _NUM_CLASSES[dataset]
    names = [str(i) for i in range(n)]
    if meta_file.exists():
        names = [v.decode() for v in _unpickle(meta_file)[names_key]]
    out["classes"] = np.array(names)
    return out


def _fingerprint(p: Path) -> str:
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def load_cifar_arrays(
    path: str | os.PathLike[str],
    dataset: str = "cifar10",
    cache_dir: str | os.PathLike[str] | None = None,
    key: str = "data.path",
) -> dict[str, np.ndarray]:
    """Decode (once) and return ``x_train, y_train, x_test, y_test`` (uint8 NHWC / int64) and ``classes``.

    The decoded arrays are cached under ``cache_dir`` (default :func:`default_cache_dir`), keyed by the
    source path, its size and modification time; ``cache_dir=False``-like empty string disables the cache.

    Raises:
        DataNotFoundError: the path is missing or holds no recognised layout (the message names ``key``).
    """
    if dataset not in _NUM_CLASSES:
        raise ValueError(f"dataset must be one of {sorted(_NUM_CLASSES)}, got {dataset!r}")
    src = resolve_path(path, key, f"{dataset} data", _hint(dataset))
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise DataNotFoundError(f"{key}: {src} is a file but not a zip archive{_hint(dataset)}")
        kind, reader, fp = "zip", lambda: _read_zip(src, key), _fingerprint(src)
    elif (tv := _torchvision_dir(src, dataset)) is not None:
        fp = "|".join(_fingerprint(f) for f in sorted(tv.iterdir()) if f.is_file())
        kind, reader = "torchvision", lambda: _read_torchvision(tv, dataset)
    elif (root := _imagefolder_root(src)) is not None:
        fp = "|".join(_fingerprint(root / s) + f"|{sum(1 for _ in (root / s).rglob('*'))}" for s in _SPLITS)
        kind, reader = "folder", lambda: _read_folder(root, key)
    else:
        raise DataNotFoundError(f"{key}: no {dataset} data layout recognised at {src}{_hint(dataset)}")
    cache_file = None
    if cache_dir is None or str(cache_dir):
        cdir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        digest = hashlib.sha1(f"v{_CACHE_VERSION}|{dataset}|{kind}|{fp}".encode()).hexdigest()[:16]
        cache_file = cdir / f"{dataset}-{kind}-{digest}.npz"
        if cache_file.exists():
            with np.load(cache_file, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}

    where = f", cached in {cache_file} for later runs" if cache_file is not None else ""
    status(f"reading {dataset} from {src} ({kind}){where}")
    arrays = reader()
    n = _NUM_CLASSES[dataset]
    if len(arrays["classes"]) != n:
        raise ValueError(f"{src}: expected {n} classes for {dataset}, found {len(arrays['classes'])}")
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=cache_file.parent)
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, cache_file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return arrays


def _hint(dataset: str) -> str:
    env = "FLATQ_CIFAR10" if dataset == "cifar10" else "FLATQ_CIFAR100"
    return (
        f"; expected a zip or folder in ImageFolder layout (train/<class>/*.jpg, test/<class>/*.jpg) or "
        f"torchvision's {_TV_DIRS[dataset]} folder (set it with data.path=... or the {env} variable)"
    )
