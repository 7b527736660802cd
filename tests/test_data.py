"""Data loaders: registered sets, MNIST IDX files and CIFAR-10 python batches (fakes written to tmp_path),
error messages, and random_flip."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from pyro_ddpm import data
from pyro_ddpm.data import NAMES, Dataset, load, random_flip

# (shape, levels, n_train, n_test, preset)
EXPECTED = {
    "digits": ((1, 8, 8), 17, 1437, 360, "digits"),
    "swiss_roll": ((2,), 256, 3000, 1000, "toy2d"),
    "two_moons": ((2,), 256, 3000, 1000, "toy2d"),
    "eight_gaussians": ((2,), 256, 3000, 1000, "toy2d"),
    "mnist5k": ((1, 28, 28), 256, 4000, 1000, "mnist"),
    "mnist5k-binary": ((1, 28, 28), 2, 4000, 1000, "mnist"),
}
# not quantized (levels = 0): the continuous versions of the 2-D toys, (shape, n_train, n_test, preset)
CONTINUOUS = {
    "swiss_roll-continuous": ((2,), 3000, 1000, "toy2d"),
    "two_moons-continuous": ((2,), 3000, 1000, "toy2d"),
    "eight_gaussians-continuous": ((2,), 3000, 1000, "toy2d"),
}


def grid_index(x: torch.Tensor, levels: int) -> torch.Tensor:
    """k with x = -1 + 2k/(K-1), asserting x lies on the grid."""
    k = (x.double() + 1.0) * (levels - 1) / 2.0
    assert (k - k.round()).abs().max() < 1e-4
    return k.round().long()


def test_names_are_the_registered_loaders():
    assert set(NAMES) == set(EXPECTED) | set(CONTINUOUS) == set(data.LOADERS)
    assert isinstance(NAMES, tuple)


@pytest.fixture(scope="module")
def loaded():
    """Each registered set loaded twice with seed 0 (identical splits expected) and once with seed 1."""
    return {name: (load(name), load(name), load(name, seed=1)) for name in NAMES}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_registered_set(loaded, name):
    d, again, other = loaded[name]
    shape, levels, n_train, n_test, preset = EXPECTED[name]
    assert (d.name, d.shape, d.levels, d.preset) == (name, shape, levels, preset)
    assert (len(d.train), len(d.test)) == (n_train, n_test)
    assert d.dims == int(np.prod(shape))
    assert d.flip is False and d.source == ""
    assert d.train.dtype == d.test.dtype == torch.float32
    for split in (d.train, d.test):
        k = grid_index(split, levels)
        assert k.min() >= 0 and k.max() <= levels - 1
    # A fixed seed gives identical splits; another seed gives another split of the same points.
    assert torch.equal(d.train, again.train) and torch.equal(d.test, again.test)
    assert not torch.equal(d.test, other.test)


def test_level_usage(loaded):
    digits = loaded["digits"][0]
    assert len(torch.unique(digits.train)) == 17  # all 17 levels occur
    mnist = loaded["mnist5k"][0]
    values = torch.unique(torch.cat([mnist.train.reshape(-1), mnist.test.reshape(-1)]))
    assert values.min() == -1.0 and values.max() == 1.0 and len(values) > 200
    # The 8-bit map k / 127.5 - 1 is the one quantize(., 256) gives.
    assert torch.equal(values, torch.as_tensor(data.quantize(values.double().numpy(), 256), dtype=torch.float32))
    for name in ("swiss_roll", "two_moons", "eight_gaussians"):
        d = loaded[name][0]
        assert d.train.abs().max() <= 1.0 and d.train.abs().max() > 0.9  # scaled to fill [-1, 1]


def test_eight_gaussians_has_eight_modes(loaded):
    x = torch.cat([loaded["eight_gaussians"][0].train, loaded["eight_gaussians"][0].test]).double()
    radius = x.norm(dim=1)
    assert 0.8 < radius.median() < 1.0 and (radius - radius.median()).abs().max() < 0.3
    sector = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (np.pi / 4)).long() % 8
    counts = torch.bincount(sector, minlength=8)
    assert (counts > 400).all()


def test_check_images_still_runs(monkeypatch):
    bad = torch.full((4, 2), 0.3)  # off the 256-level grid
    monkeypatch.setitem(data.LOADERS, "bad", lambda seed=0: Dataset("bad", bad, bad, 256, "toy2d"))
    with pytest.raises(ValueError, match="bad train split is off the 256-level grid"):
        load("bad")


def test_dataset_defaults():
    x = torch.zeros(2, 2)
    d = Dataset("d", x, x, 2, "toy2d")
    assert d.flip is False and d.source == "" and d.shape == (2,) and d.dims == 2


# --------------------------------------------------------------------------- MNIST IDX fakes
def write_idx(path, images: np.ndarray, magic: int = 2051, gz: bool = False, cut: int = 0) -> str:
    n, rows, cols = images.shape
    raw = np.array([magic, n, rows, cols], dtype=">u4").tobytes() + images.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    path = str(path) + (".gz" if gz else "")
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    return path


def fake_mnist(folder, gz=False, spelling="train-images-idx3-ubyte", n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    train[0, 0, :3] = [0, 255, 128]
    os.makedirs(folder, exist_ok=True)
    write_idx(os.path.join(folder, spelling), train, gz=gz)
    write_idx(os.path.join(folder, spelling.replace("train", "t10k")), test, gz=gz)
    return train, test


def assert_bytes_roundtrip(x: torch.Tensor, pixels: np.ndarray):
    assert x.dtype == torch.float32
    assert np.array_equal(grid_index(x, 256).numpy().astype(np.uint8), pixels)
    # Exactly k / 127.5 - 1 rounded once from float64.
    assert np.array_equal(x.numpy(), (pixels / 127.5 - 1.0).astype(np.float32))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("spelling", ["train-images-idx3-ubyte", "train-images.idx3-ubyte"])
def test_mnist_idx_roundtrip(tmp_path, gz, spelling):
    train, test = fake_mnist(tmp_path, gz=gz, spelling=spelling)
    d = load(str(tmp_path))
    assert (d.name, d.preset, d.levels, d.shape, d.flip) == ("mnist", "mnist", 256, (1, 28, 28), False)
    assert d.source == os.path.abspath(tmp_path)
    assert (len(d.train), len(d.test)) == (5, 3)
    assert_bytes_roundtrip(d.train[:, 0], train)
    assert_bytes_roundtrip(d.test[:, 0], test)
    # Explicit prefix, a path to one of the IDX files, and name:source all read the same data.
    for spec in (f"mnist:{tmp_path}", os.path.join(tmp_path, os.listdir(tmp_path)[0]), f"{d.name}:{d.source}"):
        again = load(spec)
        assert torch.equal(again.train, d.train) and torch.equal(again.test, d.test)


# --------------------------------------------------------------------------- CIFAR-10 fakes
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_images(seed=0):
    """{batch: (N, 3, 32, 32) uint8}: 2 images per training batch, 3 in the test batch, with marks."""
    rng = np.random.default_rng(seed)
    images = {b: rng.integers(0, 256, size=(3 if b == "test_batch" else 2, 3, 32, 32), dtype=np.uint8) for b in BATCHES}
    images["test_batch"][0, :, 0, 0] = [10, 20, 30]  # channels of pixel (0, 0)
    images["test_batch"][0, 0, 0, 31] = 200  # red, top-right corner
    images["test_batch"][0, 2, 31, 0] = 250  # blue, bottom-left corner
    return images


def batch_bytes(images: np.ndarray) -> bytes:
    rows = images.reshape(len(images), 3072)  # CHW row-major, as the python version stores them
    return pickle.dumps({b"batch_label": b"fake", b"labels": [0] * len(images), b"data": rows, b"filenames": []})


def fake_cifar_dir(folder, images, skip=()):
    folder = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for b, x in images.items():
        if b not in skip:
            with open(os.path.join(folder, b), "wb") as f:
                f.write(batch_bytes(x))
    return folder


def fake_cifar_tar(path, images, skip=()):
    with tarfile.open(path, "w:gz") as tar:
        for b, x in list(images.items()) + [("batches.meta", None)]:
            if b in skip:
                continue
            raw = pickle.dumps({b"label_names": []}) if x is None else batch_bytes(x)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{b}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


def check_cifar(d: Dataset, images, source: str):
    assert (d.name, d.preset, d.levels, d.shape, d.flip) == ("cifar10", "cifar10", 256, (3, 32, 32), True)
    assert d.source == os.path.abspath(source)
    assert (len(d.train), len(d.test)) == (10, 3)
    assert_bytes_roundtrip(d.train, np.concatenate([images[b] for b in BATCHES[:5]]))
    assert_bytes_roundtrip(d.test, images["test_batch"])
    first = grid_index(d.test[0], 256)
    assert first[:, 0, 0].tolist() == [10, 20, 30]
    assert first[0, 0, 31] == 200 and first[2, 31, 0] == 250


def test_cifar_tarball(tmp_path):
    images = cifar_images()
    tar = fake_cifar_tar(tmp_path / "cifar-10-python.tar.gz", images)
    check_cifar(load(tar), images, tar)
    check_cifar(load(str(tmp_path)), images, tar)  # a folder holding the tarball
    check_cifar(load(f"cifar10:{tmp_path}"), images, tar)
    assert not os.path.exists(tmp_path / "cifar-10-batches-py")  # nothing extracted


def test_cifar_extracted_folder(tmp_path):
    images = cifar_images(seed=1)
    folder = fake_cifar_dir(tmp_path, images)
    check_cifar(load(folder), images, folder)
    check_cifar(load(str(tmp_path)), images, folder)  # a folder holding cifar-10-batches-py/
    d = load(f"cifar10:{folder}")
    check_cifar(d, images, folder)
    check_cifar(load(f"{d.name}:{d.source}"), images, folder)


# --------------------------------------------------------------------------- errors
def test_empty_folder(tmp_path):
    with pytest.raises(ValueError) as e:
        load(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg
    for wanted in (
        "train-images-idx3-ubyte",
        "t10k-images-idx3-ubyte",
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        "data_batch_1",
        "test_batch",
    ):
        assert wanted in msg
    with pytest.raises(ValueError, match="no MNIST data in .*t10k-images-idx3-ubyte"):
        load(f"mnist:{tmp_path}")
    with pytest.raises(ValueError, match="no CIFAR-10 data in .*cifar-10-python.tar.gz"):
        load(f"cifar10:{tmp_path}")


def test_mnist_test_file_missing(tmp_path):
    fake_mnist(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(ValueError, match=r"missing t10k-images-idx3-ubyte\[\.gz\] \(found train-images-idx3-ubyte\)"):
        load(str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(tmp_path, gz):
    fake_mnist(tmp_path)
    bad = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), gz=gz, cut=100)
    if gz:
        os.remove(tmp_path / "t10k-images-idx3-ubyte")  # so the .gz is the one read
    with pytest.raises(ValueError, match="wrong size") as e:
        load(str(tmp_path))
    assert bad in str(e.value) and "expected 2368" in str(e.value)  # 16 + 3 * 784
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), cut=790)  # header cut short
    with pytest.raises(ValueError, match="truncated.*16-byte header"):
        load(str(tmp_path))


def test_corrupt_gzip(tmp_path):
    fake_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match="cannot read MNIST IDX file .*train-images-idx3-ubyte.gz"):
        load(str(tmp_path))


def test_bad_magic(tmp_path):
    fake_mnist(tmp_path)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8), magic=2049)
    with pytest.raises(ValueError, match="bad magic number 2049") as e:
        load(str(tmp_path))
    assert path in str(e.value)


def test_cifar_incomplete_or_corrupt(tmp_path):
    images = cifar_images()
    folder = fake_cifar_dir(tmp_path / "a", images, skip=("test_batch", "data_batch_3"))
    with pytest.raises(ValueError, match="missing data_batch_3, test_batch") as e:
        load(folder)
    assert folder in str(e.value)
    tar = fake_cifar_tar(tmp_path / "cifar-10-python.tar.gz", images, skip=("data_batch_5",))
    with pytest.raises(ValueError, match="lacks data_batch_5"):
        load(tar)
    folder = fake_cifar_dir(tmp_path / "b", images)
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ValueError, match="batch .*data_batch_2 is not a readable pickle"):
        load(folder)
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        f.write(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8)}))
    with pytest.raises(ValueError, match=r"data_batch_2: b'data' is uint8 \(2, 1024\), expected uint8 \(N, 3072\)"):
        load(folder)


def test_unknown_names(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown data set 'cifar100'") as e:
        load("cifar100")
    assert all(name in str(e.value) for name in NAMES)
    monkeypatch.setenv("PYRO_DDPM_DATA", str(tmp_path / "cache"))  # an empty data cache; nothing is downloaded
    with pytest.raises(ValueError, match="no MNIST files in the data cache .*--download"):
        load("mnist")
    with pytest.raises(ValueError, match="no such file or folder"):
        load(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="mnist data: no such file or folder"):
        load(f"mnist:{tmp_path / 'nowhere'}")
    both = tmp_path / "both"
    fake_mnist(both)
    fake_cifar_dir(both, cifar_images())
    with pytest.raises(ValueError, match="both MNIST and CIFAR-10"):
        load(str(both))
    assert load(f"mnist:{both}").name == "mnist" and load(f"cifar10:{both}").name == "cifar10"


# --------------------------------------------------------------------------- random_flip
def test_random_flip():
    x = torch.arange(64 * 2 * 3 * 5, dtype=torch.float32).reshape(64, 2, 3, 5)
    original = x.clone()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    y = random_flip(x, g)
    chosen = torch.rand(64, generator=torch.Generator().set_state(state)) < 0.5
    assert 0 < int(chosen.sum()) < 64
    assert torch.equal(y[chosen], x[chosen].flip(-1))
    assert torch.equal(y[~chosen], x[~chosen])
    assert torch.equal(x, original)  # not in place
    assert torch.equal(random_flip(x, torch.Generator().manual_seed(0)), y)  # reproducible
    assert not torch.equal(random_flip(x, torch.Generator().manual_seed(1)), y)
    assert not torch.equal(random_flip(x, g), y)  # the generator advanced
    with pytest.raises(ValueError, match="N, C, H, W"):
        random_flip(torch.zeros(4, 2), g)


# --------------------------------------------------------------------------- binarized and continuous sets
def test_mnist5k_binary_is_mnist5k_thresholded_at_half_the_range(loaded):
    """Values are exactly -1 / +1: +1 where the 8-bit pixel exceeds 127.5, the same split as mnist5k."""
    binary, grey = loaded["mnist5k-binary"][0], loaded["mnist5k"][0]
    assert binary.levels == 2 and not binary.continuous
    for b, g in ((binary.train, grey.train), (binary.test, grey.test)):
        assert set(torch.unique(b).tolist()) == {-1.0, 1.0}
        # grey value k / 127.5 - 1 > 0  <=>  pixel k > 127.5 (the same seed gives the same images)
        assert torch.equal(b, torch.where(g > 0, 1.0, -1.0))
    ones = int((binary.train > 0).sum() + (binary.test > 0).sum())
    assert 0.1 < ones / (5000 * 784) < 0.2  # MNIST is mostly background


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_continuous_toy_set(loaded, name):
    d, again, other = loaded[name]
    shape, n_train, n_test, preset = CONTINUOUS[name]
    assert (d.name, d.shape, d.levels, d.preset, d.continuous) == (name, shape, 0, preset, True)
    assert (len(d.train), len(d.test)) == (n_train, n_test) and d.dims == 2
    assert d.train.dtype == d.test.dtype == torch.float32
    assert torch.equal(d.train, again.train) and torch.equal(d.test, again.test)  # deterministic split
    assert not torch.equal(d.test, other.test)
    quantized = loaded[name.replace("-continuous", "")][0]
    for split, q in ((d.train, quantized.train), (d.test, quantized.test)):
        x = split.double()
        assert torch.isfinite(x).all() and x.abs().max() <= 1.0
        # not on a grid: almost no value is a 256-level (or 17-level) grid point
        for levels in (256, 17):
            k = (x + 1.0) * (levels - 1) / 2.0
            assert float(((k - k.round()).abs() < 1e-4).double().mean()) < 0.01
        assert len(torch.unique(split)) > 0.99 * split.numel()
        # the same points as the quantized set (same seed, same order), before rounding to 256 levels
        assert (x - q.double()).abs().max() <= 1.0 / 255 + 1e-6
        assert (x - q.double()).abs().max() > 1.0 / 255 / 2


def test_continuous_levels_in_loaders(monkeypatch):
    """levels = 0: load() checks finiteness only; a NaN is still caught; bad levels are refused."""
    x = torch.tensor([[0.0123, 3.5], [-7.25, 0.5]])
    monkeypatch.setitem(data.LOADERS, "real", lambda seed=0: Dataset("real", x, x, 0, "toy2d"))
    d = load("real")
    assert d.continuous and d.levels == 0 and torch.equal(d.train, x)
    bad = x.clone()
    bad[1, 0] = float("nan")
    monkeypatch.setitem(data.LOADERS, "nan", lambda seed=0: Dataset("nan", bad, x, 0, "toy2d"))
    with pytest.raises(ValueError, match="nan train split contains NaN"):
        load("nan")
    for levels in (1, -1):
        with pytest.raises(ValueError, match=f"data set 'odd': levels must be K >= 2 .* got {levels}"):
            Dataset("odd", x, x, levels, "toy2d")
    assert not Dataset("grid", x, x, 256, "toy2d").continuous
    with pytest.raises(ValueError, match="need K >= 2 levels"):
        data.quantize(np.zeros(2), 0)


def test_continuous_toy_loaders_take_levels():
    """The toy loaders quantize to any K >= 2 (their default 256) or, with levels = 0, not at all."""
    for loader in (data.swiss_roll, data.two_moons, data.eight_gaussians):
        coarse = loader(seed=2, n=400, levels=5)
        assert coarse.levels == 5 and coarse.name == loader.__name__
        assert set(torch.unique(coarse.train).tolist()) <= {-1.0, -0.5, 0.0, 0.5, 1.0}
        real = loader(seed=2, n=400, levels=0)
        assert real.name == f"{loader.__name__}-continuous" and real.continuous
        assert torch.equal(
            torch.as_tensor(data.quantize(real.train.double().numpy(), 5), dtype=torch.float32), coarse.train
        )
