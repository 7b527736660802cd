"""Sampling from a reverse-process model: ancestral (Algorithm 2), respaced ancestral, DDIM; PNG output.

:func:`sample` runs a Pyro program's chain form with no data (the same program ``pyro.infer.Predictive``
runs), in batches, without keeping a trace of the intermediate states. :func:`sampling_program` builds that
program:

- ``"ancestral"`` with ``steps`` None or T: the model itself, Algorithm 2 over T steps;
- ``"ancestral"`` with S < T steps: the model respaced to S evenly spaced timesteps
  (:func:`pyro_ddpm.respace.respace`), Algorithm 2 over the respaced schedule;
- ``"ddim"``: :class:`pyro_ddpm.models.ddim.DDIM` over S steps (default T) with the given eta.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import torch
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from pyro_ddpm.figures import new_figure, save_figure
from pyro_ddpm.models import DDIM
from pyro_ddpm.respace import respace

SAMPLERS = ("ancestral", "ddim")


class Progress(Messenger):
    """A progress bar over the sample sites a chain visits (one per reverse step and image batch)."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def _pyro_post_sample(self, msg):
        self.bar.update(1)


def sampling_program(model, sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0):
    """The Pyro program whose ``chain(num_images=n)`` draws from ``model`` with the chosen sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampler == "ddim":
        return DDIM(model, steps, eta)
    if eta != 0:
        raise ValueError(f"sample: eta applies to sampler='ddim' only, got eta = {eta!r} with sampler='ancestral'")
    if steps is None or (not isinstance(steps, bool) and isinstance(steps, numbers.Integral) and steps == model.T):
        return model
    return respace(model, steps)


@torch.no_grad()
def sample(model, n: int, sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0, *,
           batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """``n`` draws x_0, shape (n, *model.shape), on the model's device, ``batch_size`` images per chain.

    :param sampler: ``"ancestral"`` or ``"ddim"`` (see :func:`sampling_program`).
    :param steps: S network calls per image, 2 <= S <= T (default T).
    :param eta: DDIM's eta in [0, 1] (0: deterministic given x_T); only for ``"ddim"``.
    :param progress: show a progress bar over the reverse steps.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"number of samples must be a positive integer, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    program = sampling_program(model, sampler, steps, eta)
    was_training = model.training  # the network is shared: restore the model's own mode afterwards
    program.eval()
    batches = range(0, n, batch_size)
    sites = (len(program.timesteps) if hasattr(program, "timesteps") else model.T) + 1
    bar = tqdm(total=len(batches) * sites, desc=f"sample {sampler}", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        with Progress(bar):
            return torch.cat([program.chain(None, min(batch_size, n - i)) for i in batches])
    finally:
        bar.close()
        model.train(was_training)


def image_grid(images: torch.Tensor, ncol: int | None = None) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] tiled into one (rows*H, ncol*W[, C]) array in [0, 1]."""
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) / 2).numpy()
    N, C, H, W = x.shape
    ncol = ncol or math.ceil(math.sqrt(N))
    nrow = math.ceil(N / ncol)
    grid = np.ones((nrow * (H + 1) + 1, ncol * (W + 1) + 1, C), dtype=np.float32)
    for i in range(N):
        r, c = divmod(i, ncol)
        grid[1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = x[i].transpose(1, 2, 0)
    return grid[..., 0] if C == 1 else grid


def save_png(samples: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None) -> Path:
    """An image grid (image data) or a scatter plot (2-D points, with ``reference`` data beside), atomically."""
    if samples.dim() == 4:
        grid = image_grid(samples)
        fig, axes = new_figure(size=(grid.shape[1] / 20, grid.shape[0] / 20))
        fig.set_layout_engine("none")
        ax = axes[0, 0]
        ax.set_position([0, 0, 1, 1])
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    elif samples.dim() == 2 and samples.shape[1] == 2:
        fig, axes = new_figure(size=(4, 4))
        ax = axes[0, 0]
        if reference is not None:
            ax.scatter(*reference.cpu().T, s=2, alpha=0.3, label="data")
        ax.scatter(*samples.cpu().T, s=2, alpha=0.6, label="samples")
        ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), aspect="equal")
        ax.legend(loc="upper right", fontsize=7)
    else:
        raise ValueError(f"cannot draw samples of shape {tuple(samples.shape)}: expected (N, C, H, W) images or (N, 2) points")
    return save_figure(fig, path)
