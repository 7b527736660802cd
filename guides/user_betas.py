"""A forward process over a user-given variance schedule beta_1..beta_T.

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),   0 < beta_t < 1,  T >= 2   (Eq. 2)

Every other constant follows from the array (:func:`pyro_ddpm.schedule.derive`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import Schedule

from .forward_process import ForwardProcess


def read_betas(spec: str) -> np.ndarray:
    """beta_1..beta_T from a comma-separated list (``"0.1,0.2,0.3"``) or a ``.npy`` / text file path."""
    try:
        is_file = Path(spec).is_file()
    except OSError:  # e.g. a long list is not a valid file name
        is_file = False
    try:
        if is_file and spec.endswith(".npy"):
            return np.load(spec, allow_pickle=False).astype(np.float64)
        text = Path(spec).read_text() if is_file else spec
        return np.array([float(v) for v in text.replace(",", " ").split()], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"user betas: cannot read {spec!r} as a comma-separated list or a file of numbers: {e}") from e


@GUIDES.register
class UserBetasForwardProcess(ForwardProcess):
    """:class:`ForwardProcess` over a given array of betas (validated by :class:`Schedule`); its config is
    its constructor's arguments, the betas as a list."""

    def __init__(self, betas, event_dim: int | None = None):
        super().__init__(Schedule(betas), event_dim=event_dim)

    @classmethod
    def from_spec(cls, T: int, spec: str, event_dim: int | None = None) -> UserBetasForwardProcess:
        """``spec`` is the betas, comma-separated or a file path (see :func:`read_betas`); there must be T of them."""
        betas = read_betas(spec)
        if betas.size != T:
            raise ValueError(f"user betas: expected T = {T} values, got {betas.size}")
        return cls(betas, event_dim=event_dim)
