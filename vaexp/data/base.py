"""What every dataset shares: the Dataset record, binarisation, the split, the cache.

Invariants: training images stay intensities in [0, 1] (the trainer binarises them afresh every
epoch with :func:`binarize`); validation and test images are binarised once, on the CPU, from
generators seeded by dataset.binarize_seed (test: the seed's stream 0, validation: stream 1), so
evaluation sees the same bits on every device, in every run, whatever the other split's size.
A cache file (``<data dir>/<name>.pt``: uint8 pixels in the original order, with their sha256)
is written atomically, and only from the standard files; one whose pixels do not match its sha256
(or, when it has none, the standard files' where they are known) is ignored and rebuilt.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from vaexp.errors import VaexpError, one_line

log = logging.getLogger("vaexp.data")

PIXELS = 784
IMAGE_SHAPE = (28, 28)
NETWORK_CHECK_TIMEOUT_S = 5

PixelSplits = Dict[str, np.ndarray]  # {"train": uint8 [N, 784], "test": uint8 [N, 784]}


class DataError(VaexpError):
    """The data cannot be found or read; the message says what was tried and how to fix it."""


class SourceFailed(VaexpError):
    """One optional source could not deliver; the reason goes into the final message (the loaders
    catch it and try the next source: it reaches the user only inside a DataError)."""


@dataclass
class Dataset:
    name: str
    train: Tensor  # float32 [N_train, 784] intensities in [0, 1]: Bernoulli probabilities
    valid: Tensor  # float32 [N_valid, 784] of 0./1., binarised once
    test: Tensor   # float32 [N_test, 784] of 0./1., binarised once
    image_shape: Optional[tuple] = IMAGE_SHAPE  # None: not images (no picture grids)
    source: str = ""
    # True: `train` holds Bernoulli probabilities, binarised afresh every epoch by the trainer.
    # False: `train` holds the data itself (static bits, or real values), used as it is.
    binary: bool = True
    _training_digest: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    @property
    def train_mean(self) -> Tensor:
        """Mean training value per dimension (the decoder's output bias starts from it)."""
        return self.train.mean(0)

    def training_digest(self) -> str:
        """sha256 of the training and validation data as the trainer reads them (their float32
        bytes, in order), computed once: runs that trained on other data differ in it whatever
        their settings say (a dataset.path whose test files are the same, its training files not)."""
        if self._training_digest is None:
            h = hashlib.sha256()
            for part in (self.train, self.valid):
                h.update(np.ascontiguousarray(part.detach().to(device="cpu", dtype=torch.float32).numpy()))
            self._training_digest = h.hexdigest()
        return self._training_digest


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


def data_dir_of(cfg: Any) -> Path:
    return Path(cfg.data_dir).expanduser() if setting(cfg, "data_dir", None) else default_data_dir()


def setting(cfg: Any, key: str, default: Any) -> Any:
    """cfg.key, or `default` when absent or null: a dataset's config holds only its own keys
    (vaexp.schema: e.g. mnist has no shuffle_seed), and callers may pass plain namespaces."""
    value = getattr(cfg, key, default)
    return default if value is None and default is not None else value


def path_origin(path: str) -> str:
    return f"dataset.path={Path(path).expanduser().resolve()}"


def warn_if_sizes(name: str, sizes: Tuple[int, ...], expected: Tuple[int, ...], origin: str) -> None:
    # Published numbers assume the standard split; a subset is fine for tests but say so.
    if tuple(sizes) != tuple(expected):
        log.warning("dataset %s from %s has %s images per split (the standard split is %s)", name, origin,
                    "/".join(map(str, sizes)), "/".join(map(str, expected)))


# --------------------------------------------------------------------------- split + binarise

def to_unit(pixels: np.ndarray) -> Tensor:
    """uint8 pixels -> float32 intensities in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0)


def cpu_generator(seed: int, stream: int) -> torch.Generator:
    if stream:
        # the shift by a uint64: numpy 1.x refuses uint64 >> int (no safe common type)
        seed = int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device="cpu").manual_seed(seed)


def split(name: str, train: Tensor, test: Tensor, cfg: Any, device, source: str, dynamic: bool = True) -> Dataset:
    """float32 [N, 784] images in [0, 1] -> a Dataset on `device`: optionally shuffled
    (dataset.shuffle_seed, numpy's RandomState as Burda et al.'s code), the last n_valid training
    images held out; validation and test binarised once when `dynamic` (static data are 0/1
    already and used as they are)."""
    shuffle_seed = setting(cfg, "shuffle_seed", None)
    if shuffle_seed is not None:
        train = train[torch.from_numpy(np.random.RandomState(int(shuffle_seed)).permutation(len(train)))]
    n_valid = setting(cfg, "n_valid", 400)
    n_all = len(train)
    if not 0 <= n_valid < n_all:
        raise DataError(f"dataset.n_valid={n_valid}: must be between 0 and {n_all - 1} "
                        f"({name} has {n_all} training images); lower dataset.n_valid")
    valid = train[n_all - n_valid:]
    if dynamic:
        seed = setting(cfg, "binarize_seed", 1234)
        valid = binarize(valid, cpu_generator(seed, stream=1))
        test = binarize(test, cpu_generator(seed, stream=0))
    return Dataset(name=name, train=train[:n_all - n_valid].contiguous().to(device), valid=valid.to(device),
                   test=test.to(device), image_shape=IMAGE_SHAPE, source=source, binary=dynamic)


# --------------------------------------------------------------------------- cache

def digests(raw: PixelSplits) -> Dict[str, str]:
    """sha256 of each split's uint8 pixels (original order): what identifies a copy of the data."""
    return {part: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for part, a in sorted(raw.items())}


def read_cache(cache_file: Path, tried: List[str], standard: Optional[Dict[str, str]] = None,
               standard_sizes: Optional[Tuple[int, int]] = None) -> Optional[Tuple[PixelSplits, str]]:
    """The cached pixels and their source, or None (absent, unreadable, or not what was written:
    torch.load checks no CRC, so the pixels are checked against the sha256 stored with them; a
    cache from before the sha256 were stored, which an older vaexp may have filled from a subset,
    is checked against `standard`, the standard files' digests where they are known, and their
    (train, test) sizes)."""
    if not cache_file.is_file():
        tried.append(f"cache {cache_file}: not present")
        return None
    try:
        obj = torch.load(cache_file, map_location="cpu", weights_only=True)
        raw = {part: check_pixels(obj[part], f"cache['{part}']") for part in ("train", "test")}
        stored, actual = obj.get("sha256"), None
        if stored is not None or standard is not None:
            actual = digests(raw)
        if stored is not None and actual != stored:
            raise DataError("its pixels do not match the sha256 stored with them (damaged)")
        sizes = (len(raw["train"]), len(raw["test"]))
        if stored is None and ((standard is not None and actual != standard)
                               or (standard_sizes is not None and sizes != tuple(standard_sizes))):
            raise DataError(f"it holds other images than the standard files ({sizes[0]}/{sizes[1]} train/test; "
                            f"an older vaexp cached a dataset.path)")
        return raw, str(obj.get("source", "an earlier run"))
    except Exception as e:  # a damaged cache must not stop a run that can rebuild it
        reason = one_line(e)
        log.warning("ignoring the cache %s (%s); it will be rebuilt", cache_file, reason)
        tried.append(f"cache {cache_file}: ignored ({reason})")
        return None


def check_pixels(t: Any, what: str) -> np.ndarray:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 2 or t.shape[1] != PIXELS or len(t) == 0:
        desc = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise DataError(f"{what} is {desc}, expected a uint8 tensor [N, {PIXELS}]")
    return t.numpy()


def write_cache(cache_file: Path, raw: PixelSplits, origin: str) -> None:
    """Atomic write (temp file + rename), so a crash or a concurrent run never leaves half a file."""
    # Not mkstemp: its 0600 mode would make a shared cache unreadable to others; torch.save honours the umask.
    tmp = cache_file.parent / f".{cache_file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"train": torch.from_numpy(np.ascontiguousarray(raw["train"])),
                    "test": torch.from_numpy(np.ascontiguousarray(raw["test"])), "source": origin,
                    "sha256": digests(raw)}, tmp)
        os.replace(tmp, cache_file)
    except (OSError, RuntimeError) as e:  # a read-only cache dir costs speed next time, not this run
        log.warning("could not write the cache %s (%s); set dataset.data_dir or VAEXP_DATA_DIR to a "
                    "writable folder to avoid reloading next time", cache_file, one_line(e))
    finally:  # also on Ctrl-C: no half-written temporary left in the cache folder
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


# --------------------------------------------------------------------------- downloads

def check_reachable(url: str) -> None:
    """Fail fast on an offline machine instead of hanging inside a downloader."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=NETWORK_CHECK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the server answered; the downloader will deal with the status
    except Exception as e:
        raise SourceFailed(f"cannot reach {url} ({one_line(e)})") from None


class temp_dir:
    """A scratch folder under data_dir (same file system as the cache), always removed."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    def __enter__(self) -> Path:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(dir=self.data_dir, prefix=".download-"))
        except OSError as e:
            raise SourceFailed(f"cannot create a download folder in {self.data_dir} ({one_line(e)})") from None
        return self.path

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
