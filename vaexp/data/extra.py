"""OMNIGLOT (Burda et al.'s chardata.mat, or torchvision's) and statically binarised MNIST (.amat).

Invariants: Burda's chardata.mat is read column-major as the IWAE code reads it and shuffled with
numpy's RandomState(dataset.shuffle_seed) before the validation split; torchvision's Omniglot is
a different split (background = train) and says so in its source string; .amat data are static
0/1 images, used as they are (no binarisation every epoch). A given dataset.path is always read
(it wins over any cache) and fails loudly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple, Union

import numpy as np
import torch

from vaexp.data import base
from vaexp.data.base import (IMAGE_SHAPE, PIXELS, DataError, Dataset, PixelSplits, SourceFailed, data_dir_of,
                             path_origin, read_cache, setting, split, temp_dir, warn_if_sizes,
                             write_cache)
from vaexp.errors import one_line

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
_CACHED_SIZES = (AMAT_SIZES[0] + AMAT_SIZES[1], AMAT_SIZES[2])  # the cache's train (train + valid) and test


def amat_name(part: str) -> str:
    return f"binarized_mnist_{part}.amat"



def load_omniglot_dataset(name: str, cfg: Any, device) -> Dataset:
    """dataset=omniglot: dynamically binarised like MNIST."""
    train, test, source = load_omniglot(cfg)
    return split(name, _tensor(train), _tensor(test), cfg, device, source, dynamic=True)


def load_binarized_mnist_dataset(name: str, cfg: Any, device) -> Dataset:
    """dataset=binarized_mnist: static bits, used as they are."""
    train, test, source = load_binarized_mnist(cfg)
    return split(name, _tensor(train), _tensor(test), cfg, device, source, dynamic=False)


# -- omniglot

def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


def load_omniglot(cfg: Any) -> Tuple[np.ndarray, np.ndarray, str]:
    """(train, test, source), float32 [N, 784] in [0, 1]. Sources in order: dataset.path
    (Burda's chardata.mat: a file or the folder holding it), the cache of an earlier torchvision
    download (<data dir>/omniglot_torchvision.pt), torchvision's Omniglot resized to 28x28."""
    path = setting(cfg, "path", None)
    if path:
        train, test = read_chardata(path)
        warn_if_sizes("omniglot", (len(train), len(test)), CHARDATA_SIZES, path_origin(path))
        return train, test, path_origin(path)
    data_dir = data_dir_of(cfg)
    cache_file = data_dir / "omniglot_torchvision.pt"
    tried = ["dataset.path: not set"]
    cached = read_cache(cache_file, tried)
    if cached is not None:
        raw, origin = cached
        return _unit(raw["train"]), _unit(raw["test"]), f"cache {cache_file} (from {origin})"
    label = "torchvision Omniglot download (background set = train, evaluation set = test, resized to 28x28)"
    if not bool(setting(cfg, "download", True)):
        tried.append(label + " (skipped: dataset.download=false)")
    else:
        try:
            raw = _omniglot_from_torchvision(data_dir)
            write_cache(cache_file, raw, label)
            return _unit(raw["train"]), _unit(raw["test"]), label
        except Exception as e:  # an optional source: report it with the others
            tried.append(f"{label}: {one_line(e)}")
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
        raise DataError(f"dataset.path={path}: {p.name} is not a readable MATLAB file ({one_line(e)}); {fix}") from None
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


def _omniglot_from_torchvision(data_dir: Path) -> PixelSplits:
    try:  # lazily: vaexp never needs torchvision
        import torchvision.datasets as tv_datasets
    except Exception as e:
        raise SourceFailed(f"torchvision is not usable ({one_line(e)})") from None
    cls = tv_datasets.Omniglot
    prefix = getattr(cls, "download_url_prefix", None)
    if prefix:
        base.check_reachable(f"{prefix}/images_background.zip")
    raw: PixelSplits = {}
    with temp_dir(data_dir) as tmp:
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
    path = setting(cfg, "path", None)
    data_dir = data_dir_of(cfg)
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
        origin = path_origin(str(folder))
        sizes = tuple(len(s) for s in splits)
        warn_if_sizes("binarized_mnist", sizes, AMAT_SIZES, origin)
        raw = {"train": np.concatenate(splits[:2]) * np.uint8(255), "test": splits[2] * np.uint8(255)}
        # only the full files fill the cache (a subset must not become what later runs read)
        if sizes == AMAT_SIZES and read_cache(cache_file, [], standard_sizes=_CACHED_SIZES) is None:
            write_cache(cache_file, raw, origin)  # absent or damaged: later runs without a path use this
        return _unit(raw["train"]), _unit(raw["test"]), origin
    tried = ["dataset.path: not set"]
    cached = read_cache(cache_file, tried, standard_sizes=_CACHED_SIZES)
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
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
    lines = [ln for ln in blob.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty; expected one line of {PIXELS} 0/1 values per image")
    arr = np.frombuffer(blob, dtype=np.uint8)
    is_digit = (arr == ord("0")) | (arr == ord("1"))
    others = arr[~is_digit]
    if np.isin(others, np.frombuffer(b" \t\r\n", dtype=np.uint8)).all():
        values = arr[is_digit] - ord("0")  # the common case: single-character 0/1 tokens
        starts = np.concatenate(([0], np.flatnonzero(arr == ord("\n")) + 1))
        per_line = np.add.reduceat(is_digit.astype(np.int64), starts[starts < arr.size])
        per_line = per_line[per_line > 0]  # the non-blank lines
        if per_line.size and len(lines[0].split()) != per_line[0]:
            per_line = np.array([len(ln.split()) for ln in lines])  # tokens of more than one character
    else:
        try:
            values = np.array(blob.split(), dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: not an .amat file of numbers; expected {PIXELS} 0/1 values per line") from None
        if not np.isin(values, (0.0, 1.0)).all():
            raise DataError(f"{path}: values other than 0 and 1; expected statically binarised images")
        values = values.astype(np.uint8)
        per_line = np.array([len(ln.split()) for ln in lines])
    # every line: a total that comes out right could hide one short and one long line
    wrong = np.flatnonzero(per_line != PIXELS)
    if wrong.size or values.size != len(lines) * PIXELS:
        at = f"image {wrong[0] + 1} (a non-blank line) has {per_line[wrong[0]]}" if wrong.size else \
            f"{values.size} values on {len(lines)} lines"
        raise DataError(f"{path}: {at} values; expected {PIXELS} per line (one 28x28 image per line)")
    return values.reshape(len(lines), PIXELS).astype(np.uint8)
