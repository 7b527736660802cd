"""The data grid: K levels v_k = -1 + 2k/(K - 1), k = 0..K-1, spread evenly over [-1, 1].

Quantized data (8-bit images: K = 256; the sklearn digits: K = 17) lie on this grid. Level k's bin is
[v_k - h, v_k + h] with half-width h = 1/(K - 1) (bin width Delta = 2/(K - 1)); neighbouring bins share
their edges. Every conversion between values, level indices and bins goes through this module:

    position(x, K)   (x + 1)(K - 1)/2, the fractional level index of a value
    index(x, K)      the nearest level index (a long tensor)
    value(k, K)      v_k for level indices k;  values(K): all K of them
    edges(k, K)      level k's bin edges;  half_width(K), width(K)
    off_grid(x, K)   distance from the nearest level, in levels;  on_grid / check: within tolerance
    quantize(x, K)   numpy: values rounded to the nearest level

The functions work on torch tensors, numpy arrays and floats alike (``index`` and ``values`` make torch
tensors). Each keeps one fixed order of floating-point operations, so a value it computes is the same float
wherever it is called; ``value`` (k * (2/(K-1)) - 1) and ``quantize`` (k * 2/(K-1) - 1) are two orders
and may differ by one ulp at some levels (both are kept: results computed with each are reproduced
exactly).
"""

from __future__ import annotations

import numpy as np
import torch

# Tolerances of the grid checks: how far outside [-1, 1] a value may lie, and how far from its level (in
# levels) -- float32 data keeps the 8-bit grid's values to about 1e-5 levels.
RANGE_TOLERANCE = 1e-6
LEVEL_TOLERANCE = 1e-3


def position(x, levels: int):
    """(x + 1)(K - 1)/2: the level index k of a grid value v_k, fractional between levels."""
    return (x + 1.0) * (levels - 1) / 2.0


def index(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The nearest level index round((x + 1)(K - 1)/2), clamped to 0..K-1, as a long tensor."""
    return position(x, levels).round().long().clamp(0, levels - 1)


def value(k, levels: int, dtype: torch.dtype | None = None):
    """v_k = -1 + 2k/(K - 1) for level indices ``k``.

    An integer tensor is cast to ``dtype`` (default torch's default dtype) first, a floating-point one
    only when ``dtype`` is given; numpy arrays and numbers are used as they are.
    """
    if torch.is_tensor(k) and (dtype is not None or not k.is_floating_point()):
        k = k.to(dtype or torch.get_default_dtype())
    return k * (2.0 / (levels - 1)) - 1.0


def values(levels: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """The K grid values v_0 = -1, ..., v_{K-1} = 1, a tensor in ``dtype`` on ``device``."""
    return value(torch.arange(levels, dtype=dtype or torch.get_default_dtype(), device=device), levels)


def half_width(levels: int) -> float:
    """h = 1/(K - 1): the distance from a level to its bin's edges."""
    return 1.0 / (levels - 1)


def width(levels: int) -> float:
    """Delta = 2/(K - 1): the width of a bin, the spacing of the levels."""
    return 2.0 / (levels - 1)


def edges(k, levels: int):
    """Level k's bin [v_k - h, v_k + h] as (lower, upper) = (-1 + (2k - 1)/(K - 1), -1 + (2k + 1)/(K - 1)).

    Computed from the (float) level index, so neighbouring bins share their edge exactly.
    """
    return -1.0 + (2.0 * k - 1.0) / (levels - 1), -1.0 + (2.0 * k + 1.0) / (levels - 1)


def off_grid(x, levels: int):
    """``|position - round(position)|``: how far each value lies from its nearest level, in levels."""
    k = position(x, levels)
    return (k - k.round()).abs()


def on_grid(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Elementwise: in [-1, 1] and on a level, within :data:`RANGE_TOLERANCE` and :data:`LEVEL_TOLERANCE`."""
    inside = (x >= -1.0 - RANGE_TOLERANCE) & (x <= 1.0 + RANGE_TOLERANCE)
    return inside & (off_grid(x, levels) <= LEVEL_TOLERANCE)


def check(x: torch.Tensor, levels: int, name: str = "x_0") -> None:
    """One ValueError naming the problem unless the finite tensor ``x`` lies in [-1, 1] on the K-level grid."""
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must lie in [-1, 1] (data scaled from {levels} levels), got values in [{lo:.4g}, {hi:.4g}]"
        )
    off = off_grid(x.double(), levels)
    if float(off.max()) > LEVEL_TOLERANCE:
        bad = x.reshape(-1)[off.reshape(-1).argmax()].item()
        raise ValueError(
            f"{name} is off the {levels}-level grid -1 + 2k/{levels - 1}: e.g. {bad:.6g} "
            f"({int((off > LEVEL_TOLERANCE).sum())} values off the grid)"
        )


def quantize(x: np.ndarray, levels: int) -> np.ndarray:
    """Values in [-1, 1] (numpy, float64) rounded to the nearest level; values outside are clipped first.

    The level's value is computed as k * 2 / (K - 1) - 1 (k * 2 is exact, so one rounding): the float64
    value of an 8-bit pixel k / 127.5 - 1 for K = 256.
    """
    k = np.rint(position(np.clip(x, -1.0, 1.0), levels))
    return k * 2.0 / (levels - 1) - 1.0
