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

import contextlib
import io
import math
import numbers
from pathlib import Path

import matplotlib.image
import numpy as np
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from tqdm.auto import tqdm

from pyro_ddpm.figures import new_figure, save_figure
from pyro_ddpm.files import atomic_write
from pyro_ddpm.models import DDIM
from pyro_ddpm.programs import require
from pyro_ddpm.respace import respace

SAMPLERS = ("ancestral", "ddim")


class Progress(Messenger):
    """A progress bar over the sample sites a chain visits (one per reverse step and image batch)."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def _pyro_post_sample(self, msg):
        if not isinstance(msg["fn"], _Subsample):  # a plate's own site is not a reverse step
            self.bar.update(1)


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s floating-point parameters and buffers that hold NaN or infinite values."""
    return [
        n
        for n, v in list(module.named_parameters()) + list(module.named_buffers())
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


@contextlib.contextmanager
def finite_network_outputs(model):
    """Inside, a network call of ``model`` (its ``eps`` module) that returns NaN or infinite values raises one
    ValueError saying so, at which timesteps, and whether the weights themselves are non-finite.

    Sampling and evaluation run inside it: without it a broken network surfaces as a distribution's
    argument-validation error about ``loc`` (or, with validation off, as NaN samples and bounds).
    """
    net = getattr(model, "eps", None)
    if not isinstance(net, torch.nn.Module):
        yield
        return

    def hook(module, args, output):
        if not torch.is_tensor(output) or bool(torch.isfinite(output).all()):
            return
        nan, total = int(torch.isnan(output).sum()), output.numel()
        inf = int(torch.isinf(output).sum())
        t = args[1] if len(args) > 1 and torch.is_tensor(args[1]) and args[1].numel() else None
        at = (
            ""
            if t is None
            else (
                f" at t = {int(t.min())}" if int(t.min()) == int(t.max()) else f" at t = {int(t.min())}..{int(t.max())}"
            )
        )
        broken = non_finite_tensors(module)
        cause = (
            f"its weights are not finite ({len(broken)} tensors, e.g. {broken[0]}): the checkpoint holds a "
            "diverged model"
            if broken
            else "its weights are finite: the output overflowed"
        )
        raise ValueError(f"the network returned non-finite values{at} ({nan} NaN, {inf} infinite of {total}); {cause}")

    handle = net.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sampling_program(model, sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0):
    """The Pyro program whose ``chain(num_images=n)`` draws from ``model`` with the chosen sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampler == "ddim":
        require(model, "ddim", "DDIM sampling")
        return DDIM(model, steps, eta)
    if eta != 0:
        raise ValueError(f"sample: eta applies to sampler='ddim' only, got eta = {eta!r} with sampler='ancestral'")
    if steps is None or (not isinstance(steps, bool) and isinstance(steps, numbers.Integral) and steps == model.T):
        return model
    require(model, "respace", f"ancestral sampling in {steps} < T = {model.T} steps (respacing)")
    return respace(model, steps)


@torch.no_grad()
def sample(
    model,
    n: int,
    sampler: str = "ancestral",
    steps: int | None = None,
    eta: float = 0.0,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """``n`` draws x_0, shape ``(n, *model.shape)``, on the model's device, ``batch_size`` images per chain.

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
    bar = tqdm(
        total=len(batches) * sites, desc=f"sample {sampler}", unit="step", disable=not progress, dynamic_ncols=True
    )
    try:
        with Progress(bar), finite_network_outputs(model):
            return torch.cat([program.chain(None, min(batch_size, n - i)) for i in batches])
    finally:
        bar.close()
        model.train(was_training)


# What a saved sample grid looks like: tiles of at least MIN_TILE pixels (small images scaled up by an
# integer factor, nearest neighbour), PAD pixels of a light blue between and around them (a colour no
# gray-scale sample has, so the tiles stay apart on black, white or noisy backgrounds).
MIN_TILE = 64
PAD = 4
PAD_COLOR = (0.55, 0.7, 0.95)


def image_grid(
    images: torch.Tensor, ncol: int | None = None, scale: int = 1, pad: int = 1, pad_value: float | tuple = 1.0
) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] tiled into one array in [0, 1]: (rows, cols) for C = 1, else (rows, cols, C).

    Each image is scaled up ``scale`` times (pixel repetition) and the tiles are separated and framed by
    ``pad`` pixels of ``pad_value`` (a gray level, or an RGB colour: the grid is then RGB, (rows, cols, 3)).
    """
    if images.dim() != 4:
        raise ValueError(f"image_grid: expected images (N, C, H, W), got shape {tuple(images.shape)}")
    for name, value, least in (("scale", scale, 1), ("pad", pad, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"image_grid: {name} must be an integer >= {least}, got {value!r}")
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) / 2).numpy()
    if scale > 1:
        x = x.repeat(scale, axis=2).repeat(scale, axis=3)
    colour = np.asarray(pad_value, dtype=np.float32).reshape(-1)
    if colour.size not in (1, 3):
        raise ValueError(f"image_grid: pad_value must be a gray level or an RGB colour, got {pad_value!r}")
    if colour.size == 3 and x.shape[1] == 1:
        x = x.repeat(3, axis=1)
    N, C, H, W = x.shape
    if colour.size == 3 and C != 3:
        raise ValueError(f"image_grid: an RGB pad_value needs 1 or 3 channels, got {C}")
    ncol = ncol or math.ceil(math.sqrt(N))
    nrow = math.ceil(N / ncol)
    grid = np.empty((nrow * (H + pad) + pad, ncol * (W + pad) + pad, C), dtype=np.float32)
    grid[...] = colour
    for i in range(N):
        r, c = divmod(i, ncol)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[top : top + H, left : left + W] = x[i].transpose(1, 2, 0)
    return grid[..., 0] if C == 1 else grid


def save_png(samples: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None) -> Path:
    """An image grid (image data: tiles of at least :data:`MIN_TILE` pixels with gray gaps, see
    :func:`image_grid`) or a scatter plot (2-D points, with ``reference`` data beside), written atomically."""
    if samples.dim() == 4:  # the grid's pixels themselves, written as they are (no figure, no resampling)
        scale = max(1, math.ceil(MIN_TILE / max(samples.shape[-2:])))
        grid = image_grid(samples, scale=scale, pad=PAD, pad_value=PAD_COLOR if samples.shape[1] in (1, 3) else 1.0)
        buffer = io.BytesIO()
        matplotlib.image.imsave(buffer, grid, cmap="gray", vmin=0, vmax=1, format="png")
        return atomic_write(path, lambda f: f.write(buffer.getvalue()))
    if samples.dim() == 2 and samples.shape[1] == 2:
        fig, axes = new_figure(size=(4, 4))
        ax = axes[0, 0]
        if reference is not None:
            ax.scatter(*reference.cpu().T, s=2, alpha=0.3, label="data")
        ax.scatter(*samples.cpu().T, s=2, alpha=0.6, label="samples")
        ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), aspect="equal")
        ax.legend(loc="upper right", fontsize=7)
    else:
        raise ValueError(
            f"cannot draw samples of shape {tuple(samples.shape)}: expected (N, C, H, W) images or (N, 2) points"
        )
    return save_figure(fig, path)
