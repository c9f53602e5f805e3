"""dataset=omniglot (Burda's chardata.mat; torchvision's Omniglot) and dataset=binarized_mnist
(Larochelle's .amat files), on small fixtures written here."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_BURDA1
from vaexp.data import DataError, base, extra, load_dataset
from vaexp.data.extra import omniglot_to_28, read_amat, read_chardata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg(name, **kw):
    base = dict(name=name, path=None, data_dir=None, n_valid=5, binarize_seed=1234, download=False,
                shuffle_seed=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


# --------------------------------------------------------------------------- chardata.mat

def upright_images(n: int, offset: int = 0) -> np.ndarray:
    """[n, 28, 28] images that are not symmetric: image i has row (i + offset) % 28 fully lit and a
    half-intensity left column, so a transposed or flipped reading is detected."""
    imgs = np.zeros((n, 28, 28), np.float32)
    for i in range(n):
        imgs[i, (i + offset) % 28, :] = 1.0
        imgs[i, :, 0] = 0.5
    return imgs


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray, **extra) -> Path:
    scipy_io = pytest.importorskip("scipy.io")
    # MATLAB layout: one image per column, each image flattened column-major.
    mat = {"data": np.stack([im.flatten(order="F") for im in train], 1).astype(np.float64),
           "testdata": np.stack([im.flatten(order="F") for im in test], 1).astype(np.float64)}
    mat.update(extra)
    scipy_io.savemat(str(path), mat)
    return path


def test_chardata_orientation_matches_burdas_reader(tmp_path):
    train, test = upright_images(30), upright_images(8, offset=5)
    path = write_chardata(tmp_path / "chardata.mat", train, test)
    tr, te = read_chardata(path)
    assert tr.dtype == np.float32 and tr.shape == (30, 784) and te.shape == (8, 784)
    assert np.array_equal(tr, train.reshape(30, 784))     # row-major upright images, like MNIST
    assert np.array_equal(te, test.reshape(8, 784))
    # Burda et al.'s datasets.py: data.T.reshape((-1, 28, 28)).reshape((-1, 784), order='fortran')
    import scipy.io

    raw = scipy.io.loadmat(str(path))["data"].T.astype(np.float32)
    assert np.array_equal(raw.reshape((-1, 28, 28)).reshape((-1, 784), order="F"), tr)
    assert np.array_equal(read_chardata(tmp_path)[0], tr)  # the folder works too


def test_omniglot_split_shuffle_and_dynamic_binarisation(tmp_path):
    train, test = upright_images(40), upright_images(10, offset=3)
    write_chardata(tmp_path / "chardata.mat", train, test)
    ds = load_dataset(cfg("omniglot", path=str(tmp_path), n_valid=6, shuffle_seed=123), "cpu")
    perm = np.random.RandomState(123).permutation(40)   # Burda et al.'s shuffle, then the last n_valid
    shuffled = torch.from_numpy(train.reshape(40, 784)[perm])
    assert torch.equal(ds.train, shuffled[:34])
    assert ds.binary is True                             # the trainer binarises train every epoch
    assert ds.valid.shape == (6, 784) and set(ds.valid.unique().tolist()) <= {0.0, 1.0}
    assert set(ds.test.unique().tolist()) <= {0.0, 1.0}
    # where the intensity is 0 or 1 the bits are exact; the 0.5 column is random
    assert torch.equal(ds.test.reshape(10, 28, 28)[:, :, 1:], torch.from_numpy(test[:, :, 1:]))
    again = load_dataset(cfg("omniglot", path=str(tmp_path), n_valid=6, shuffle_seed=123), "cpu")
    assert torch.equal(again.test, ds.test) and torch.equal(again.valid, ds.valid)
    unshuffled = load_dataset(cfg("omniglot", path=str(tmp_path), n_valid=6), "cpu")
    assert torch.equal(unshuffled.train, torch.from_numpy(train.reshape(40, 784)[:34]))


@pytest.mark.parametrize("bad,words", [
    ({"data": None}, ["'data'", "missing"]),
    ({"testdata": np.zeros((100, 3))}, ["'testdata'", "shape"]),
    ({"data": np.full((784, 3), 2.0)}, ["outside [0, 1]"]),
])
def test_chardata_bad_contents(tmp_path, bad, words):
    scipy_io = pytest.importorskip("scipy.io")
    mat = {"data": np.zeros((784, 4)), "testdata": np.zeros((784, 2))}
    mat.update({k: v for k, v in bad.items() if v is not None})
    if bad.get("data", 0) is None:
        del mat["data"]
    scipy_io.savemat(str(tmp_path / "chardata.mat"), mat)
    with pytest.raises(DataError) as err:
        read_chardata(tmp_path / "chardata.mat")
    for w in words:
        assert w in str(err.value)
    assert "dataset.path=" in str(err.value)


def test_chardata_missing_file_and_missing_scipy(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no chardata.mat there.*dataset.path=/path/to/chardata.mat"):
        read_chardata(tmp_path)
    (tmp_path / "chardata.mat").write_bytes(b"not matlab")
    monkeypatch.setitem(sys.modules, "scipy", None)   # `import scipy.io` raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match=r"needs scipy.*pip install scipy"):
        read_chardata(tmp_path)


def test_omniglot_without_any_source_says_how_to_get_it(data_dir):
    with pytest.raises(DataError) as err:
        load_dataset(cfg("omniglot", download=False), "cpu")
    msg = str(err.value)
    assert "dataset.path=/path/to/chardata.mat" in msg and "torchvision" in msg and "download=false" in msg


# --------------------------------------------------------------------------- torchvision Omniglot

def test_omniglot_to_28_area_averages_and_inverts():
    from PIL import Image

    canvas = np.full((105, 105), 255, np.uint8)   # white background
    canvas[:, :17] = 0     # a black stroke over the left 17 of 105 columns: 4.53 of the 28 cells
    out = omniglot_to_28(Image.fromarray(canvas))
    img = out.reshape(28, 28)
    assert out.dtype == np.uint8 and img[:, :4].min() == 255 and img[:, 5:].max() == 0
    assert 100 < img[0, 4] < 160            # cell 4 is 2/3.75 covered: gray ink ~ 136


def test_omniglot_from_torchvision_is_used_and_cached(data_dir, monkeypatch):
    """torchvision's Omniglot (faked: no network here): background set = train, evaluation = test."""
    from PIL import Image

    made = []

    class FakeOmniglot:
        download_url_prefix = "https://example.invalid/omniglot"

        def __init__(self, root, background=True, download=False):
            made.append(background)
            self.n = 12 if background else 4
            self.value = 0 if background else 128

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Image.fromarray(np.full((105, 105), self.value, np.uint8)), 0

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(Omniglot=FakeOmniglot)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", tv.datasets)
    monkeypatch.setattr(base, "check_reachable", lambda url: None)
    ds = load_dataset(cfg("omniglot", download=True, n_valid=2), "cpu")
    assert made == [True, False]
    assert ds.train.shape == (10, 784) and torch.all(ds.train == 1.0)   # black everywhere = all ink
    assert ds.test.shape == (4, 784)
    assert "torchvision" in ds.source
    assert (data_dir / "omniglot_torchvision.pt").is_file()
    made.clear()
    again = load_dataset(cfg("omniglot", download=True, n_valid=2), "cpu")   # from the cache now
    assert made == [] and torch.equal(again.train, ds.train) and "cache" in again.source


# --------------------------------------------------------------------------- binarized MNIST (.amat)

def write_amat(folder: Path, sizes=(30, 7, 9), seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in zip(("train", "valid", "test"), sizes):
        a = (rng.random((n, 784)) < 0.3).astype(np.uint8)
        splits[split] = a
        (folder / f"binarized_mnist_{split}.amat").write_text("\n".join(" ".join(map(str, row)) for row in a) + "\n")
    return splits


def test_binarized_mnist_is_static_and_split_like_the_files(tmp_path, data_dir, monkeypatch):
    splits = write_amat(tmp_path / "amat")
    monkeypatch.setattr(extra, "AMAT_SIZES", (30, 7, 9))  # these files as the full set (only it is cached)
    ds = load_dataset(cfg("binarized_mnist", path=str(tmp_path / "amat"), n_valid=7), "cpu")
    assert ds.binary is False                  # no dynamic binarisation: train is used as it is
    assert torch.equal(ds.train, torch.from_numpy(splits["train"]).float())
    assert torch.equal(ds.valid, torch.from_numpy(splits["valid"]).float())
    assert torch.equal(ds.test, torch.from_numpy(splits["test"]).float())
    # read once, cached: later runs need no path
    again = load_dataset(cfg("binarized_mnist", n_valid=7), "cpu")
    assert torch.equal(again.train, ds.train) and torch.equal(again.test, ds.test)
    assert "cache" in again.source
    # a subset is read, never cached
    write_amat(tmp_path / "small", sizes=(20, 7, 9), seed=1)
    small = load_dataset(cfg("binarized_mnist", path=str(tmp_path / "small"), n_valid=7,
                             data_dir=str(tmp_path / "empty")), "cpu")
    assert len(small.train) == 20 and not (tmp_path / "empty" / "binarized_mnist.pt").exists()
    # one of the files as the path works too
    one = load_dataset(cfg("binarized_mnist", path=str(tmp_path / "amat" / "binarized_mnist_test.amat"),
                           n_valid=7), "cpu")
    assert torch.equal(one.valid, ds.valid)


def test_an_older_vaexps_subset_cache_of_binarized_mnist_is_not_used(data_dir):
    """Before caches stored their sha256, a dataset.path subset filled the cache: such a cache (no
    sha256, not the files' 60,000 / 10,000) is ignored, with the reason, not read as the data."""
    data_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"train": torch.zeros(50, 784, dtype=torch.uint8), "test": torch.zeros(9, 784, dtype=torch.uint8),
                "source": "dataset.path=/old/subset"}, data_dir / "binarized_mnist.pt")
    with pytest.raises(DataError, match=r"other images than the standard files \(50/9 train/test"):
        load_dataset(cfg("binarized_mnist"), "cpu")


def test_amat_parser(tmp_path):
    p = tmp_path / "x.amat"
    p.write_text("0 1 " * 392 + "\n" + "1 0 " * 392 + "\n")
    a = read_amat(p)
    assert a.shape == (2, 784) and a.dtype == np.uint8 and a[0, 1] == 1 and a[1, 0] == 1
    p.write_text(" ".join(["1.0"] * 784) + "\n" + " ".join(["0"] * 784) + "\n")   # float tokens
    assert read_amat(p).sum() == 784
    shifted = ["0 " * 783 + "0", "1 " * 783, "0 " * 784 + "1"]  # one short line, one long: the total is right
    for text, words in [("0 1 0\n", ["3 values", "784 per line"]),
                        ("\n".join(shifted) + "\n", ["image 2", "783 values", "784 per line"]),
                        ("\n".join(s.replace("0", "0.0").replace("1", "1.0") for s in shifted),
                         ["image 2", "783 values"]),
                        (" ".join(["2"] * 784) + "\n", ["other than 0 and 1"]),
                        (" ".join(["a"] * 784) + "\n", ["not an .amat file"]),
                        ("", ["empty"])]:
        p.write_text(text)
        with pytest.raises(DataError) as err:
            read_amat(p)
        for w in words:
            assert w in str(err.value)


def test_binarized_mnist_missing_files(tmp_path, data_dir):
    write_amat(tmp_path / "amat")
    (tmp_path / "amat" / "binarized_mnist_valid.amat").unlink()
    with pytest.raises(DataError, match=r"binarized_mnist_valid.amat not found.*larocheh"):
        load_dataset(cfg("binarized_mnist", path=str(tmp_path / "amat")), "cpu")
    with pytest.raises(DataError, match=r"no such file or folder"):
        load_dataset(cfg("binarized_mnist", path=str(tmp_path / "nope")), "cpu")
    with pytest.raises(DataError, match=r"no data found.*dataset.path=/that/folder"):
        load_dataset(cfg("binarized_mnist"), "cpu")


def test_train_on_binarized_mnist_end_to_end(tmp_path, data_dir, vaexp_main):
    write_amat(tmp_path / "amat", sizes=(40, 20, 10))
    res = vaexp_main("train", "dataset=binarized_mnist", f"dataset.path={tmp_path / 'amat'}", "dataset.n_valid=20",
                     *TINY_BURDA1, "schedule=quick", "schedule.epochs=1", "eval.k=10", "eval.au_samples=4",
                     "progress=false", f"out_root={tmp_path / 'out'}")
    assert res.code == 0, res.err
    assert "test NLL" in res.out and "ELBO surgery" in res.out


def test_a_relative_dataset_path_is_recorded_absolute(tmp_path, data_dir, vaexp_main, monkeypatch):
    """config.yaml records where the data were read from, so `vaexp eval` from another working
    directory reads the same files (with the path as typed it would read none, or others)."""
    write_amat(tmp_path / "work" / "amat", sizes=(40, 20, 10))
    monkeypatch.chdir(tmp_path / "work")
    run = tmp_path / "run"
    res = vaexp_main("train", "dataset=binarized_mnist", "dataset.path=amat", "dataset.n_valid=20", *TINY_BURDA1,
                     "schedule=quick", "schedule.epochs=1", "eval.k=10", "eval.au_samples=4", "progress=false",
                     f"hydra.run.dir={run}")
    assert res.code == 0, res.err
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["dataset"]["path"] == str(tmp_path / "work" / "amat")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = vaexp_main("eval", str(run), "progress=false")
    assert res.code == 0, res.err


def test_missing_data_is_one_clear_line(tmp_path, vaexp_main):
    res = vaexp_main("train", "dataset=binarized_mnist", *TINY_BURDA1, "schedule=quick", "progress=false",
              f"out_root={tmp_path / 'out'}")
    assert res.code == 2
    assert "Traceback" not in res.err
    lines = [ln for ln in res.err.splitlines() if ln.startswith("vaexp:")]
    assert len(lines) == 1 and "dataset.path=" in lines[0] and "binarized_mnist_train.amat" in lines[0]
