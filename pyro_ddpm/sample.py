"""Ancestral sampling (Algorithm 2) from a reverse-process model, and PNG output.

:func:`sample` runs the model's chain form with no data (the same program ``pyro.infer.Predictive``
runs), in batches, without keeping a trace of the T intermediate states.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch



@torch.no_grad()
def sample(model, n: int, batch_size: int = 256) -> torch.Tensor:
    """``n`` draws x_0 ~ p_theta(x_0), shape (n, *model.shape), on the model's device."""
    if n < 1:
        raise ValueError(f"number of samples must be positive, got {n}")
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model.chain(None, min(batch_size, n - i)) for i in range(0, n, batch_size)])
    finally:
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
    from pyro_ddpm.figures import new_figure, save_figure

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
