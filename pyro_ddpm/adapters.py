"""Networks trained elsewhere, wrapped into this library's model and guide so that the bound works unchanged.

Every adapter returns ``(model, guide)``: a :class:`~pyro_ddpm.models.ReverseProcess` (or
:class:`~pyro_ddpm.models.LearnedVarianceReverseProcess`) around an :class:`EpsNetwork`, and a
:class:`~pyro_ddpm.guides.ForwardProcess` on the same :class:`~pyro_ddpm.schedule.Schedule`. The pair
follows :mod:`pyro_ddpm.protocol`, so :func:`pyro_ddpm.evaluate.bound`, sampling, the probability-flow
likelihood (:mod:`pyro_ddpm.ode`) and the importance-weighted bound (:mod:`pyro_ddpm.importance_weighted`)
take it as they take a model trained here.

Conventions (docs/evaluate_elsewhere.md derives each):

- Timesteps. The library's t runs over 1..T: x_t ~ q(x_t | x_0) with abar_t = prod_{s<=t} (1 - beta_s)
  (Ho et al. Eq. 4), and the network is called as ``eps(x_t, t)``. improved-diffusion,
  guided-diffusion and diffusers index the same schedule from 0: their timestep i uses
  ``alphas_cumprod[i] = abar_{i+1}``. So a zero-based network is called as ``net(x_t, t - 1)``.
- Output. A tensor shaped like x_t (eps), or (B, 2C, ...) for a learned variance: eps, then v with
  frac = (v + 1) / 2 between log beta_tilde_t (beta_tilde_2 at t = 1) and log beta_t (Nichol and
  Dhariwal Eq. 15, as improved-diffusion and diffusers' ``learned_range``). An object with a
  ``.sample`` attribute (diffusers' ``UNet2DOutput``) or a tuple is unpacked to its first tensor.
- Precision. The network runs in its own parameter dtype (float32 for a parameterless callable),
  whatever the input's dtype; its output is cast back. The schedule algebra stays float64.
- Data. Images on the K-level grid of [-1, 1]; :func:`to_grid` maps uint8 0..255 (or integer levels
  0..K-1) to -1 + 2k/(K-1), computed in float64 and rounded once to float32.
- Decoder. ``levels = K >= 2``: the discretized Gaussian of Eq. 13 (bits/dim); ``levels = 0`` or
  ``None``: the Gaussian density (continuous data, nats/dim).

diffusers is optional: the diffusers functions import it inside and raise a ValueError naming
``pip install -e ".[diffusers]"`` when it is missing. Nothing is ever downloaded: a saved pipeline is
loaded with ``local_files_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pyro_ddpm import grid
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import check_images, default_likelihood
from pyro_ddpm.models import LearnedVarianceReverseProcess, ReverseProcess
from pyro_ddpm.nets import EpsNetwork
from pyro_ddpm.schedule import Schedule

VARIANCES = ("large", "small", "learned")

# diffusers' DDPMScheduler.config.variance_type -> this library's variance. ``fixed_small_log`` is the
# same variance as ``fixed_small`` (diffusers only computes it in log space).
DIFFUSERS_VARIANCES = {
    "fixed_small": "small",
    "fixed_small_log": "small",
    "fixed_large": "large",
    "learned_range": "learned",
}

DIFFUSERS_HINT = 'diffusers is not installed: pip install -e ".[diffusers]"'


def likelihood_for(levels):
    """The decoder for data with ``levels`` values per dimension (:func:`pyro_ddpm.likelihoods.default_likelihood`)."""
    return default_likelihood(levels)


def _as_schedule(betas) -> Schedule:
    if isinstance(betas, Schedule):
        return betas
    if torch.is_tensor(betas):
        betas = betas.detach().cpu().double().numpy()
    return Schedule(np.asarray(betas, dtype=np.float64))


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"shape must be a tuple of positive integers (one datum, e.g. (3, 32, 32)), got {shape!r}"
        ) from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive integers (one datum), got {shape!r}")
    return shape


def build(network: EpsNetwork, schedule: Schedule, shape, levels=256, variance: str = "large", likelihood=None):
    """(model, guide) around an :class:`EpsNetwork`: the reverse process for ``variance`` and the forward process."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance type {variance!r}; choose one of {VARIANCES}")
    shape = _check_shape(shape)
    likelihood = likelihood if likelihood is not None else likelihood_for(levels)
    cls = LearnedVarianceReverseProcess if variance == "learned" else ReverseProcess
    model = cls(network, schedule, variance, likelihood, shape=shape)
    return model, ForwardProcess(schedule, event_dim=len(shape))


def from_callable(
    fn,
    betas,
    shape,
    levels=256,
    variance: str = "large",
    zero_based: bool = False,
    dtype: torch.dtype | None = None,
    likelihood=None,
):
    """(model, guide) for a network or plain function ``fn(x_t, t)`` and its schedule beta_1..beta_T.

    :param betas: beta_1..beta_T (array, tensor or a :class:`~pyro_ddpm.schedule.Schedule`), float64.
    :param shape: the shape of one datum, e.g. (1, 28, 28) or (2,).
    :param variance: ``"large"`` (sigma_t^2 = beta_t), ``"small"`` (beta_tilde_t) or ``"learned"``
        (``fn`` returns 2C channels: eps, then v).
    :param zero_based: ``fn`` takes t in 0..T-1 (called as ``fn(x, t - 1)``).
    :param dtype: the dtype ``fn`` is run in (default: its parameters'; a function without parameters runs
        in the images' dtype).
    """
    schedule, shape = _as_schedule(betas), _check_shape(shape)
    network = EpsNetwork(fn, zero_based=zero_based, dtype=dtype, shape=shape)
    return build(network, schedule, shape, levels, variance, likelihood)


def from_improved_diffusion(
    net,
    betas,
    learn_sigma: bool = False,
    levels=256,
    shape=None,
    sigma_small: bool = False,
    rescale_timesteps: bool = False,
    dtype: torch.dtype | None = None,
):
    """(model, guide) for an improved-diffusion / guided-diffusion style network and its betas.

    Such a network takes the zero-based timestep i = t - 1 (``alphas_cumprod[i] = abar_t``) and returns
    eps, or with ``learn_sigma`` 2C channels (eps, then v: their ``LEARNED_RANGE``). Without it the
    variance is fixed: ``large`` (their ``FIXED_LARGE``, the default; beta_tilde_2 at t = 1 as here),
    or ``small`` with ``sigma_small`` (``FIXED_SMALL``). With ``rescale_timesteps`` (their option) the
    network sees (t - 1) * 1000 / T, a float.

    :param shape: one datum's shape, e.g. (3, 32, 32); default ``net.shape`` if the network has one.
    """
    schedule = _as_schedule(betas)
    shape = shape if shape is not None else getattr(net, "shape", None)
    if shape is None:
        raise ValueError("from_improved_diffusion: give shape=(C, H, W) (the network does not record its data shape)")
    shape = _check_shape(shape)
    network = EpsNetwork(
        net, zero_based=True, time_scale=1000.0 / schedule.T if rescale_timesteps else 1.0, dtype=dtype, shape=shape
    )
    return build(network, schedule, shape, levels, "learned" if learn_sigma else "small" if sigma_small else "large")


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ValueError(f"{DIFFUSERS_HINT} ({e})") from None
    return diffusers


def diffusers_variance(scheduler, variance: str | None = None) -> str:
    """The library's variance for a diffusers scheduler: its ``variance_type`` mapped by
    :data:`DIFFUSERS_VARIANCES`, or ``variance`` given explicitly (``large``, ``small``, ``learned``)."""
    if variance is not None:
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance type {variance!r}; choose one of {VARIANCES}")
        return variance
    kind = getattr(scheduler, "config", {}).get("variance_type", None)
    if kind is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no variance_type: give variance='large', 'small' or 'learned'"
        )
    if kind not in DIFFUSERS_VARIANCES:
        raise ValueError(
            f"unknown variance type {kind!r} of the diffusers scheduler; supported: "
            f"{sorted(DIFFUSERS_VARIANCES)} (or give variance= explicitly)"
        )
    return DIFFUSERS_VARIANCES[kind]


def from_diffusers(unet, scheduler, levels=256, variance: str | None = None, dtype: torch.dtype | None = None):
    """(model, guide) for a diffusers ``UNet2DModel`` (or any model returning ``.sample``) and its scheduler.

    - betas: ``scheduler.betas`` as float64 (the float32 values diffusers computed, widened exactly);
      T = ``len(betas)`` must equal ``scheduler.config.num_train_timesteps``.
    - timesteps: zero-based, the network is called as ``unet(x, t - 1)``.
    - ``prediction_type`` must be ``"epsilon"``.
    - ``variance_type``: ``fixed_small`` (and ``fixed_small_log``) -> ``small``, ``fixed_large`` ->
      ``large``, ``learned_range`` -> :class:`~pyro_ddpm.models.LearnedVarianceReverseProcess` (the UNet
      then has 2C output channels). The decoder at t = 1 is this library's (sigma_1^2 = beta_tilde_2
      for the fixed variances, the clipped lower end for the learned one), as improved-diffusion
      evaluates; diffusers' sampler instead adds no noise at its last step. Sampling-only options
      (``clip_sample``, thresholding) do not enter the bound.
    - shape: (in_channels, sample_size, sample_size) from ``unet.config``.
    """
    _diffusers()
    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(scheduler, "betas"):
        raise ValueError(
            f"from_diffusers: expected a diffusers scheduler with .betas and .config, got {type(scheduler).__name__}"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"from_diffusers: prediction_type {prediction!r} is not supported; only 'epsilon'")
    betas = torch.as_tensor(scheduler.betas).detach().cpu().double()
    T = config.get("num_train_timesteps", betas.numel())
    if betas.numel() != T:
        raise ValueError(f"from_diffusers: the scheduler has {betas.numel()} betas but num_train_timesteps = {T}")
    kind = diffusers_variance(scheduler, variance)
    ucfg = getattr(unet, "config", None)
    if ucfg is None:
        raise ValueError(f"from_diffusers: expected a diffusers UNet with .config, got {type(unet).__name__}")
    size = ucfg.get("sample_size")
    channels = int(ucfg.get("in_channels"))
    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    out = int(ucfg.get("out_channels", channels))
    expected = 2 * channels if kind == "learned" else channels
    if out != expected:
        raise ValueError(
            f"from_diffusers: variance {kind!r} needs a UNet with {expected} output channels "
            f"({channels} in), this one has {out}"
        )
    shape = (channels, *hw)
    network = EpsNetwork(unet, zero_based=True, dtype=dtype, shape=shape)
    return build(network, Schedule(betas.numpy()), shape, levels, kind)


def from_diffusers_pipeline(path, levels=256, variance: str | None = None, dtype: torch.dtype | None = None):
    """(model, guide) for a pipeline folder written by ``save_pretrained`` (e.g. ``DDPMPipeline``).

    Loaded with ``local_files_only=True`` (never downloads); its ``unet`` and ``scheduler`` go to
    :func:`from_diffusers`.
    """
    diffusers = _diffusers()
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"from_diffusers_pipeline: {str(folder)!r} is not a saved pipeline folder "
            f"(no model_index.json; write one with pipeline.save_pretrained(folder))"
        )
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
    if unet is None or scheduler is None:
        raise ValueError(f"from_diffusers_pipeline: the pipeline in {str(folder)!r} has no unet and scheduler")
    return from_diffusers(unet, scheduler, levels=levels, variance=variance, dtype=dtype)


def to_grid(images, levels: int = 256, channels_last: bool = False) -> torch.Tensor:
    """Images on the K-level grid of [-1, 1] as float32: integer level k -> -1 + 2k/(K-1).

    Integer input (uint8 0..255 for K = 256, or levels 0..K-1) is mapped in float64 and rounded once
    to float32 (for K = 256: k / 127.5 - 1); floating-point input must already be on the grid and is
    returned unchanged. ``channels_last`` moves (N, H, W, C) to (N, C, H, W). ValueError for levels
    out of range or floats off the grid.
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or int(levels) < 2:
        raise ValueError(f"to_grid: levels must be an integer K >= 2, got {levels!r}")
    K = int(levels)
    if channels_last:
        if x.dim() < 3:
            raise ValueError(f"to_grid: channels_last needs (N, H, W, C) images, got shape {tuple(x.shape)}")
        x = x.movedim(-1, 1)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"to_grid: images must be integer levels or floats on the grid, got dtype {x.dtype}")
    if not x.dtype.is_floating_point:
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > K - 1):
            raise ValueError(
                f"to_grid: integer images must hold levels 0..{K - 1}, got values in {int(x.min())}..{int(x.max())}"
            )
        return grid.value(x, K, torch.float64).to(torch.float32).contiguous()
    check_images(x, K, name="to_grid input")
    return x


def bound_of(source, images, levels: int = 256, draws: int = 1, max_batch: int = 1024, seed: int = 0, **kwargs):
    """The per-term bound and its summary for ``source`` on ``images``: ``(idata, summary)``.

    ``source`` is a ``(model, guide)`` pair (from any adapter) or the path of a saved diffusers
    pipeline folder. ``images`` are integer levels (uint8) or floats on the grid (:func:`to_grid`);
    ``kwargs`` go to :func:`pyro_ddpm.evaluate.bound`.
    """
    from pyro_ddpm import evaluate  # it imports this module (to evaluate diffusers pipelines)

    if isinstance(source, (str, Path)):
        model, guide = from_diffusers_pipeline(source, levels=levels)
    else:
        model, guide = source
    x0 = to_grid(images, levels) if levels else torch.as_tensor(images)
    if tuple(x0.shape[1:]) != tuple(model.shape):
        raise ValueError(
            f"bound_of: images have shape {tuple(x0.shape)}, the model's data shape is "
            f"(N, {', '.join(map(str, model.shape))})"
        )
    device = model.device
    idata = evaluate.bound(model, guide, x0.to(device), draws=draws, max_batch=max_batch, seed=seed, **kwargs)
    return idata, evaluate.summarize(idata)
