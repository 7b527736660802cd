"""Data sets that ship with installed packages (nothing is downloaded), scaled to [-1, 1] on a K-level grid.

- ``digits``: scikit-learn's 8x8 handwritten digits, 1797 images with values 0..16 (K = 17),
  shape (1, 8, 8); fixed stratified split of 1437 train / 360 test images.
- ``swiss_roll``: the 2-D swiss roll of Sohl-Dickstein et al. (2015) from scikit-learn, 4000 points
  scaled into [-1, 1] and quantized to K = 256 levels per coordinate; 3000 train / 1000 test.

Each loader is deterministic for a given ``seed`` and checks what it returns with
:func:`pyro_ddpm.likelihoods.check_images`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyro_ddpm.likelihoods import check_images


@dataclass(frozen=True)
class Dataset:
    name: str
    train: torch.Tensor
    test: torch.Tensor
    levels: int
    preset: str  # the network preset of pyro_ddpm.nets.PRESETS that fits the data

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dims(self) -> int:
        """D, the number of data dimensions of one datum (bits/dim divides by it)."""
        return int(np.prod(self.shape))


def quantize(x: np.ndarray, levels: int) -> np.ndarray:
    """Round values in [-1, 1] to the nearest of the K levels -1 + 2k/(K-1)."""
    k = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * (levels - 1) / 2.0)
    return k * 2.0 / (levels - 1) - 1.0


def _split(x: np.ndarray, test_size: int, seed: int, stratify=None):
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(x, test_size=test_size, random_state=seed, stratify=stratify)
    return torch.as_tensor(train, dtype=torch.float32), torch.as_tensor(test, dtype=torch.float32)


def digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float64)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1, 17 levels
    train, test = _split(x, 360, seed, stratify=bunch.target)
    return Dataset("digits", train, test, 17, "digits")


def swiss_roll(seed: int = 0, n: int = 4000, noise: float = 0.3) -> Dataset:
    from sklearn.datasets import make_swiss_roll

    points, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    xy = points[:, [0, 2]]
    xy = xy / (np.abs(xy).max() * 1.05)
    train, test = _split(quantize(xy, 256), n // 4, seed)
    return Dataset("swiss_roll", train, test, 256, "toy2d")


LOADERS = {"digits": digits, "swiss_roll": swiss_roll}


def load(name: str, seed: int = 0) -> Dataset:
    """The data set ``name`` (one of :data:`LOADERS`), split with ``seed``."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}")
    data = LOADERS[name](seed=seed)
    for split in ("train", "test"):
        check_images(getattr(data, split), data.levels, name=f"{name} {split} split")
    return data
