"""The bound of Eq. 5 term by term, per image: L_T, every L_{t-1}, L_0 (nats), bits/dim, progressive coding.

The terms are the traced per-site values of the model/guide pair (:class:`pyro_ddpm.elbo.TermwiseELBO`
on the per-timestep form with every timestep), not a parallel formula, so any pair following
:mod:`pyro_ddpm.protocol` is evaluated without new code. Network calls are batched over (image,
timestep) pairs, at most ``max_batch`` pairs per call.

Noise. Each L_{t-1} is an expectation over x_t ~ q(x_t | x_0); it is estimated with ``draws``
independent draws. The standard-normal noise of image i, draw d is one stream seeded by
(seed, d, i), and :class:`~pyro_ddpm.protocol.FixedNoise` turns it into the guide's x_t by
reparameterization, so results do not depend on how images and timesteps are chunked into network calls.

Progressive coding (section 4.3, Table 4, Figure 5). At reverse step t a receiver holding x_t
predicts x_0; since the model's mean is the posterior mean at its prediction,
mu_theta(x_t, t) = coef_x0 x0_hat + coef_xt x_t (Eq. 7 with Eq. 15), the prediction is read off the
traced transition: x0_hat = (mu_theta - coef_xt x_t) / coef_x0. Its distortion is the RMSE on the
0..255 scale; the rate is the bits sent until then, L_T + L_{T-1} + ... + L_t.

Units. The terms are in nats per image. :func:`summarize` reports each part of the bound in nats per
image for every decoder and, for a decoder whose ``discrete`` attribute is True (a probability
mass: the discretized Gaussian, the Bernoulli decoder), in bits/dim = nats / (D ln 2), a code length.
For a continuous decoder (``discrete = False``: the Gaussian density for non-quantized data) L_0 is
the negative log of a *density*: bits/dim of a density is not a code length (it depends on the
units of x and can be negative), so the bound is reported in nats per dimension (nats / D), and
may be negative. The rate terms L_1..L_T are KL divergences, meaningful as rates for either kind.
The data kind is read from ``model.likelihood.discrete`` (default True) and stored in the
``bound`` group's attrs as ``discrete`` (1 or 0).

Standard errors: over images, std / sqrt(N) of the per-image values (each averaged over its draws);
with several draws, the noise-only part sqrt(sum_i var_draws(i) / draws) / N as well. Draws and
images are independent, so these are the Monte-Carlo standard errors ArviZ's ``mcse`` estimates for
correlated chains, computed exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pyro_ddpm import protocol, stats
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.files import atomic_path, atomic_write
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import EpsNetwork
from pyro_ddpm.sample import finite_network_outputs, non_finite_tensors

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz announces its 1.0 refactor on import
    import arviz as az
import xarray as xr


def image_noise(
    image_ids, steps: torch.Tensor, T: int, shape, seed: int, draw: int, kind: str = "normal"
) -> torch.Tensor:
    """Standard noise of ``kind`` (the guide's ``noise``) for x_t of each image at ``steps``:
    ``(len(image_ids), len(steps), *shape)``.

    Image i's noise is one draw of shape ``(T, *shape)`` seeded by (seed, draw, i), read at rows t - 1.
    """
    rows = steps.cpu() - 1
    out = []
    for i in image_ids:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, draw, int(i)]).generate_state(1)[0]))
        out.append(protocol.standard_noise(kind, (T, *shape), g, dtype=torch.float64)[rows])
    return torch.stack(out)


@torch.no_grad()
def bound(
    model,
    guide,
    x0: torch.Tensor,
    draws: int = 1,
    max_batch: int = 1024,
    seed: int = 0,
    image_ids=None,
    noise: torch.Tensor | None = None,
    strip_steps=None,
    progress: bool = False,
):
    """Per-image, per-term bound and progressive-coding distortion as an ``arviz.InferenceData``.

    :param x0: images ``(N, *shape)`` on the model's device.
    :param draws: noise draws per term.
    :param image_ids: identifiers seeding each image's noise (default 0..N-1).
    :param noise: optionally the guide's standard noise itself (normal or uniform, as ``guide.noise``
        says), ``(draws, N, T, *shape)``, t = 1..T.
    :param strip_steps: the timesteps at which the x_0 prediction of the first image is kept (Figure 6).
    :returns: ``InferenceData`` with group ``bound``: ``L`` (draw, image, t) in nats with t = 0..T (column
        t holds L_t), ``sq_error`` (draw, image, step), the mean squared error of x0_hat on the 0..255
        scale at reverse step 1..T, and ``x0_hat_strip`` ``(step_strip, *shape)``.
    """
    model.check_data(x0)  # one clear error before any tracing
    _check_finite_guide(guide)
    for name, value in (("draws", draws), ("max_batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    T, N, shape = model.T, x0.shape[0], tuple(x0.shape[1:])
    ids = list(range(N)) if image_ids is None else [int(i) for i in image_ids]
    strip_steps = sorted({int(s) for s in (strip_steps or _strip_steps(T))}, reverse=True)
    if strip_steps[0] > T or strip_steps[-1] < 1:
        raise ValueError(f"strip_steps must lie in 1..T = 1..{T}, got {strip_steps}")
    progressive = "progressive" in getattr(type(model), "capabilities", ())
    terms = _Terms(draws, N, T, shape, strip_steps, progressive)
    bar = tqdm(total=draws * N * T, desc="bound (image x t)", unit="term", disable=not progress, dynamic_ncols=True)
    with _evaluating(model), bar:
        for d, rows, steps in _chunks(draws, N, T, max_batch, x0.device):
            x = x0[rows]
            if noise is not None:
                eps = noise[d, rows, steps.cpu() - 1]
            else:
                eps = image_noise(ids[rows], steps, T, shape, seed, d, guide.noise)
            _score(model, guide, x, steps, eps.reshape(-1, *shape), terms, d, rows)
            bar.update(x.shape[0] * len(steps))
    return az.InferenceData(bound=terms.dataset(x0, ids, seed, model, guide))


def _chunks(draws: int, N: int, T: int, max_batch: int, device):
    """(draw, image rows, timesteps) of each network call: at most ``max_batch`` (image, timestep) pairs,
    whole images' timesteps together when they fit (draw, then images, then timesteps)."""
    images_per_call = max(1, max_batch // T)
    steps_per_call = min(T, max_batch)
    for d in range(draws):
        for i in range(0, N, images_per_call):
            rows = slice(i, min(i + images_per_call, N))
            for t0 in range(1, T + 1, steps_per_call):
                yield d, rows, torch.arange(t0, min(t0 + steps_per_call, T + 1), device=device)


@contextlib.contextmanager
def _evaluating(model):
    """The model in eval mode, a non-finite network output one ValueError saying so; its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with finite_network_outputs(model):
            yield
    finally:
        model.train(was_training)


def _score(model, guide, x, steps, eps, terms: _Terms, d: int, rows: slice) -> None:
    """The traced terms of images ``x`` at timesteps ``steps`` (the guide's x_t from the noise ``eps``) into
    ``terms``, and with them progressive coding's prediction of x_0."""
    t = steps.expand(x.shape[0], -1)
    elbo = TermwiseELBO()
    guide_program = protocol.FixedNoise({protocol.X_t: eps}, guide.from_noise)(guide.per_timestep)
    model_trace, guide_trace = elbo.traces(model.per_timestep, guide_program, x, t)
    traced = elbo.terms_from_traces(model_trace, guide_trace)
    per_pair = traced[protocol.X_PREV].value + traced[protocol.X_0].value  # masked t>1 / t=1
    terms.L[d, rows, steps.cpu() - 1] = per_pair.reshape(t.shape).double().cpu()
    if int(steps[0]) == 1:
        terms.L[d, rows, -1] = traced[protocol.X_T].value.double().cpu()
    if terms.progressive:
        x0_hat = _x0_hat(model, model_trace, guide_trace, t).reshape(*t.shape, *x.shape[1:])
        terms.add_coding(d, rows, steps, x0_hat, x)


class _Terms:
    """The bound's values, filled chunk by chunk: ``L`` (draw, image, t = 0..T) in nats, ``sq_error`` (draw,
    image, step 1..T) of x0_hat on the 0..255 scale and the first image's x0_hat at ``strip_steps``
    (NaN for a model without progressive coding)."""

    def __init__(self, draws: int, N: int, T: int, shape: tuple, strip_steps: list[int], progressive: bool):
        fill = 0.0 if progressive else float("nan")
        self.L = torch.zeros(draws, N, T + 1, dtype=torch.float64)
        self.sq_error = torch.full((draws, N, T), fill, dtype=torch.float64)
        self.strip = torch.full((len(strip_steps), *shape), fill, dtype=torch.float64)
        self.strip_steps, self.progressive = strip_steps, progressive

    def add_coding(self, d: int, rows: slice, steps: torch.Tensor, x0_hat: torch.Tensor, x: torch.Tensor) -> None:
        """Progressive coding's distortion of images ``rows`` at ``steps``; the strip from the first image."""
        err = ((x0_hat - x.double().unsqueeze(1)) * 127.5) ** 2
        self.sq_error[d, rows, steps.cpu() - 1] = err.flatten(2).mean(-1).cpu()
        if d == 0 and rows.start == 0:
            t0 = int(steps[0])
            for j, step in enumerate(self.strip_steps):
                if t0 <= step < t0 + len(steps):
                    self.strip[j] = x0_hat[0, step - t0].cpu()

    def dataset(self, x0: torch.Tensor, ids: list[int], seed: int, model, guide) -> xr.Dataset:
        """The ``bound`` group: the values with their coordinates and what produced them."""
        draws, N, T1 = self.L.shape
        shape = tuple(x0.shape[1:])
        dims = tuple(f"dim_{k}" for k in range(len(shape)))
        return xr.Dataset(
            {
                "L": (
                    ("draw", "image", "t"),
                    self.L.numpy(),
                    {"units": "nats", "description": "column t holds L_t (Eq. 5)"},
                ),
                "sq_error": (
                    ("draw", "image", "step"),
                    self.sq_error.numpy(),
                    {"description": "mean squared error of x0_hat on the 0..255 scale at reverse step"},
                ),
                "x0_hat_strip": (("strip_step",) + dims, self.strip.numpy()),
                "x0_strip": (dims, x0[0].double().cpu().numpy()),
            },
            coords={
                "draw": np.arange(draws),
                "image": np.asarray(ids),
                "t": np.arange(T1),
                "step": np.arange(1, T1),
                "strip_step": np.asarray(self.strip_steps),
            },
            attrs={
                "T": T1 - 1,
                "dims": int(np.prod(shape)),
                "draws": draws,
                "seed": seed,
                "likelihood": repr(model.likelihood),
                "discrete": int(bool(getattr(model.likelihood, "discrete", True))),
                "model": type(model).__name__,
                "guide": type(guide).__name__,
                "variance": getattr(model, "variance", ""),
            },
        )


def _check_finite_guide(guide) -> None:
    """One ValueError naming the guide's non-finite weights (a diverged learned schedule, a damaged
    checkpoint), said before Pyro's argument checks meet them."""
    broken = non_finite_tensors(guide)
    if broken:
        raise ValueError(
            f"the guide's weights are not finite ({len(broken)} tensors, e.g. {broken[0]}): "
            "the checkpoint holds a diverged or damaged forward process"
        )


def _x0_hat(model, model_trace, guide_trace, t: torch.Tensor) -> torch.Tensor:
    """Progressive coding's prediction of x_0 per pair, read off the traced transition (no extra network
    call), in float64."""
    x_t = guide_trace.nodes[protocol.X_t]["value"]
    x_t = x_t.double() if x_t.is_floating_point() else x_t
    fn = model_trace.nodes[protocol.X_PREV]["fn"]
    return model.x0_from_transition(fn, x_t, t.reshape(-1)).double()


def bound_of_network(
    eps, schedule, likelihood, x0: torch.Tensor, variance: str = "large", zero_based: bool = False, **kwargs
):
    """:func:`bound` for a bare eps network -- an ``nn.Module`` or any callable ``eps(x_t, t)`` (t in 1..T, or
    0..T-1 with ``zero_based``): the DDPM reverse process around it and the forward process."""
    protocol.check_batch(x0, x0.shape[1:] if torch.is_tensor(x0) else ())
    if getattr(eps, "shape", None) is not None:  # the network's data shape: one clear error, not its own failure
        protocol.check_batch(x0, eps.shape)
    if not isinstance(eps, torch.nn.Module) or zero_based:
        eps = EpsNetwork(eps, zero_based=zero_based)
    model = ReverseProcess(eps, schedule, variance, likelihood, shape=x0.shape[1:])
    return bound(model, ForwardProcess(schedule, event_dim=x0.dim() - 1), x0, **kwargs)


def _strip_steps(T: int) -> list[int]:
    return sorted({max(1, round(T * f)) for f in (1.0, 0.8, 0.6, 0.4, 0.25, 0.1, 0.05, 0.01)} | {1}, reverse=True)


def bound_terms(model, guide, x0: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-image terms in nats, averaged over draws: a (N, T + 1) float64 tensor, column s = L_s."""
    return torch.as_tensor(bound(model, guide, x0, **kwargs).bound["L"].values).mean(0)


def _mean_se(v: np.ndarray) -> tuple[float, float, float | None]:
    """Mean over (draw, image) of ``v``, its standard error over images and (draws > 1) the noise-only one."""
    mean, se = stats.mean_se(v.mean(0))
    return mean, se, stats.noise_se(v)


def rate_bands(T: int) -> list[tuple[int, int]]:
    """The rate terms L_1..L_{T-1} split by decades of t: (1, 9), (10, 99), (100, 999), ... up to T - 1."""
    bands, lo = [], 1
    while lo <= T - 1:
        hi = min(10 * lo - 1, T - 1)
        bands.append((lo, hi))
        lo = hi + 1
    return bands


def summarize(idata, coding_points: int = 10) -> dict:
    """The total, L_T, the rate L_1..L_{T-1} and the distortion L_0 with standard errors, and the
    progressive-coding table (rate and RMSE at reverse steps T..1).

    Each part has ``bits_per_dim``, ``se`` and (several draws) ``se_noise`` in bits/dim, and
    ``nats_per_image`` with ``se_nats_per_image``; for continuous data (``discrete`` False, see the
    module docstring) also ``nats_per_dim`` with ``se_nats_per_dim``, the bound's unit there (a
    density bound: not a code length, possibly negative; its ``bits_per_dim`` is nats_per_dim / ln 2
    and is kept only for uniform keys). ``discrete`` and ``unit`` say which applies.
    """
    ds = idata.bound
    L = ds["L"].values  # (draws, N, T + 1)
    draws, N, _ = L.shape
    D = int(ds.attrs["dims"])
    discrete = bool(int(ds.attrs.get("discrete", 1)))
    to_bpd = stats.unit_scale(D)
    parts = {
        "total": L.sum(-1),
        "prior_L_T": L[..., -1],
        "rate_L_1_to_L_T-1": L[..., 1:-1].sum(-1),
        "distortion_L_0": L[..., 0],
    }
    out = {
        "images": N,
        "dims": D,
        "draws": draws,
        "T": int(ds.attrs["T"]),
        "discrete": discrete,
        "unit": stats.unit(discrete),
    }
    for name, v in parts.items():
        mean, se, se_noise = _mean_se(v * to_bpd)
        entry = {"bits_per_dim": mean, "se": se}
        if se_noise is not None:
            entry["se_noise"] = se_noise
        entry["nats_per_image"], entry["se_nats_per_image"], _ = _mean_se(v)
        if not discrete:
            entry["nats_per_dim"], entry["se_nats_per_dim"], _ = _mean_se(v / D)
        out[name] = entry
    T = out["T"]
    out["bands"] = {}  # the rate split by decades of t: where the bound is spent
    for lo, hi in rate_bands(T):
        mean, se, _ = _mean_se(L[..., lo : hi + 1].sum(-1) * to_bpd)
        out["bands"][f"L_{lo}..L_{hi}"] = {"bits_per_dim": mean, "se": se}
    L_mean = L.mean((0, 1)) * to_bpd
    mse = ds["sq_error"].values.mean((0, 1))  # (T,), step 1..T
    steps = sorted({T} | {max(1, round(T * (1 - k / (coding_points - 1)))) for k in range(coding_points)}, reverse=True)
    out["progressive_coding"] = [
        {"step": s, "rate_bits_per_dim": float(L_mean[s:].sum()), "distortion_rmse": float(math.sqrt(mse[s - 1]))}
        for s in steps
    ]
    return out


def format_summary(summary: dict, header: str = "") -> str:
    """The summary as a table: bits/dim (nats/dim for continuous data) and nats per image per term."""
    rows = [header] if header else []
    discrete = summary.get("discrete", True)
    label = stats.unit_label(discrete)
    noise = summary["draws"] > 1
    rows.append(
        f"{'term':<20} {label:>10} {'+- s.e.':>9}"
        + (f" {'(noise)':>9}" if noise else "")
        + f" {'nats/image':>12} {'+- s.e.':>10}"
    )
    for name in ("total", "prior_L_T", "rate_L_1_to_L_T-1", "distortion_L_0"):
        v = summary[name]
        value, se = (v["bits_per_dim"], v["se"]) if discrete else (v["nats_per_dim"], v["se_nats_per_dim"])
        se_noise = v["se_noise"] * (1.0 if discrete else stats.LN2) if "se_noise" in v else None
        rows.append(
            f"{name:<20} {value:>10.5f} {se:>9.5f}"
            + (f" {se_noise:>9.5f}" if se_noise is not None else "")
            + f" {v['nats_per_image']:>12.4f} {v['se_nats_per_image']:>10.4f}"
        )
    rows.append(
        f"({summary['images']} images x {summary['draws']} noise draw(s), D = {summary['dims']}, T = {summary['T']})"
    )
    if not discrete:
        rows.append(
            "continuous data: L_0 is a density, so the bound is in nats (per dimension and per image), "
            "not a code length in bits; it can be negative"
        )
    rows.append("")
    rows.append(
        "progressive coding (Table 4): reverse step, rate so far L_T+...+L_t (bits/dim), distortion RMSE [0, 255]"
    )
    for r in summary["progressive_coding"]:
        rows.append(f"  t = {r['step']:>5}   rate {r['rate_bits_per_dim']:>8.4f}   RMSE {r['distortion_rmse']:>8.3f}")
    return "\n".join(rows)


def save(idata, summary: dict, directory: str | Path, stem: str = "bound") -> dict[str, Path]:
    """Write ``stem.nc`` (netCDF of the InferenceData) and ``stem.json`` (the summary) atomically."""
    directory = Path(directory)
    nc = directory / f"{stem}.nc"
    with atomic_path(nc) as tmp:
        idata.to_netcdf(str(tmp))
    js = atomic_write(directory / f"{stem}.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    return {"netcdf": nc, "json": js}
