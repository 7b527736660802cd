"""Summaries over images and the units of a bound.

Mean and standard error. A per-image quantity v_1..v_n (a bound, a likelihood) is reported as its mean
and the standard error std(ddof=1) / sqrt(n) of that mean (NaN for a single image: no spread to
estimate); with several independent noise draws per image, the part of it the draws contribute is
sqrt(sum_i var_draws(v_i) / draws) / n. Torch tensors are reduced by torch, numpy arrays by numpy, a list of
floats by Python's sum in its order (each gives the float its callers have always reported).

Units. A code length in nats per datum becomes bits/dim by dividing by D ln 2 (D the dimensions of one
datum). The negative log of a *density* (continuous data) is no code length: it is reported in nats/dim,
nats / D. ``discrete`` says which applies (a likelihood's ``discrete`` attribute).
"""

from __future__ import annotations

import math

import numpy as np
import torch

LN2 = math.log(2)


def mean_se(values):
    """(mean, standard error of the mean) over the first axis (images) of ``values``: a tensor, an array or a
    list of floats.

    One-dimensional values give two floats; several columns give two arrays (tensors), one entry per
    column. The s.e. is NaN for a single image.
    """
    n = len(values)
    if isinstance(values, list):
        mean = sum(values) / n
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
    if torch.is_tensor(values):
        if values.dim() == 1:
            return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
        se = values.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(values[0], math.nan)
        return values.mean(0), se
    values = np.asarray(values)
    if values.ndim == 1:
        return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    se = values.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(values.shape[1:], math.nan)
    return values.mean(0), se


def noise_se(values) -> float | None:
    """The noise-only standard error of the mean of (draws, images) ``values``: sqrt(sum_i var_d / draws) / n,
    the variance over draws (ddof=1) summed over images; None with a single draw."""
    draws, n = values.shape[:2]
    if draws < 2:
        return None
    if torch.is_tensor(values):
        return float(math.sqrt(float(values.var(0, unbiased=True).sum()) / draws) / n)
    return float(math.sqrt(values.var(0, ddof=1).sum() / draws) / n)


def nats_per_unit(dims: int, discrete: bool = True) -> float:
    """The nats in one unit of the bound per datum: D ln 2 (bits/dim) for discrete data, D (nats/dim) else."""
    return dims * LN2 if discrete else float(dims)


def per_dim(nats, dims: int, discrete: bool = True):
    """Nats per datum in the bound's unit: bits/dim (nats / (D ln 2)) for discrete data, nats/dim else."""
    return nats / nats_per_unit(dims, discrete)


def bits_per_dim(nats, dims: int):
    """nats / (D ln 2): a code length in nats per datum of D dimensions as bits per dimension (:func:`per_dim`
    of discrete data)."""
    return per_dim(nats, dims)


def unit_scale(dims: int, discrete: bool = True) -> float:
    """The factor 1 / :func:`nats_per_unit` taking nats per datum to the bound's unit (multiplied, not divided)."""
    return 1.0 / nats_per_unit(dims, discrete)


def unit(discrete: bool = True) -> str:
    """The unit's key in result dicts: ``bits_per_dim`` or ``nats_per_dim``."""
    return "bits_per_dim" if discrete else "nats_per_dim"


def unit_label(discrete: bool = True) -> str:
    """The unit as printed: ``bits/dim`` or ``nats/dim``."""
    return "bits/dim" if discrete else "nats/dim"
