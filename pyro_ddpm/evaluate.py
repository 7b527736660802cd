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

Evaluating a run. :func:`evaluate_run` is what ``pyro-ddpm evaluate`` runs: it loads a run (or a saved
diffusers pipeline), computes the bound on a data split and, when asked, the probability-flow ODE and
importance-weighted estimates on the same images, and writes them; its options are the fields of
:class:`Evaluation` (the command's flags are generated from them), :func:`format_report` the printed table.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pyro_ddpm import data as datasets
from pyro_ddpm import protocol, stats
from pyro_ddpm.adapters import from_diffusers_pipeline
from pyro_ddpm.checkpoint import load_run, resolve
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.figures import save_all
from pyro_ddpm.files import atomic_path, atomic_write, check_directory
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.importance_weighted import importance_weighted
from pyro_ddpm.likelihoods import by_name
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import EpsNetwork
from pyro_ddpm.ode import DIVERGENCES, ode_likelihood
from pyro_ddpm.options import check_all, option, optional, positive
from pyro_ddpm.registry import LIKELIHOODS
from pyro_ddpm.runtime import DEVICE_HELP, THREADS_HELP, check_device, torch_threads
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
        positive(name, value)
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


# ----------------------------------------------------------------------------- evaluating a run
SPLITS = ("train", "test")
ODE_ESTIMATE = "probability-flow ODE"


def _positive_images(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive number of images, got {value!r}")


def _likelihood_help() -> str:
    return (
        f"evaluate with another decoder: {', '.join(LIKELIHOODS.names())} (tanh_discretized_gaussian: the official "
        "code's tanh-approximated CDF) or 'module:Class' (default: the model's own)"
    )


@dataclass
class BoundSettings:
    """How the bound is computed on a split: the options ``evaluate`` and ``compare`` share."""

    limit: int | None = option(None, "evaluate only the first N images of the split", check=optional(_positive_images))
    max_batch: int = option(
        1024,
        "(image, timestep) pairs per network call (the results do not depend on it; on CPU 1024 evaluated the "
        "digits 1.6x faster than 4096, a GPU may want more)",
        check=positive,
    )
    draws: int = option(1, "noise draws per term", check=positive)


@dataclass
class Evaluation(BoundSettings):
    """The options of :func:`evaluate_run` (``pyro-ddpm evaluate``'s flags are generated from these fields)."""

    clip_denoised: bool = option(
        False, "clip the x_0 prediction to [-1, 1] in the mean, as the official evaluation does"
    )
    likelihood: str | None = option(None, _likelihood_help)
    figures: bool = option(True, "write no figures")
    split: str = option("test", "the data split to evaluate", choices=SPLITS)
    data: str | None = option(None, "data set (default: the checkpoint's)")
    download: bool = option(False, datasets.DOWNLOAD_HELP)
    seed: int = option(0, "seed of the evaluation noise")
    T: int | None = option(None, "the T the checkpoint must have")
    diffusers: str | None = option(
        None,
        "evaluate a diffusers pipeline saved with save_pretrained (local files only) instead of a run; needs --data",
        metavar="DIR",
    )
    ode: bool = option(False, "also the probability-flow ODE likelihood (dequantized: an upper bound on the NLL)")
    ode_method: str = option("rk4", "ODE solver: rk4 (fixed grid) or a torchdiffeq method")
    ode_steps: int = option(100, "solver steps for rk4", check=positive)
    divergence: str = option(
        "auto",
        "the ODE's divergence: exact for small D, Hutchinson otherwise",
        choices=DIVERGENCES,
    )
    probes: int = option(1, "Hutchinson probes per image", check=positive)
    particles: int | None = option(
        None, "also the importance-weighted bound over K full chains", check=optional(positive)
    )
    device: str = option("auto", DEVICE_HELP)
    out: str | None = option(None, "folder for the netCDF, JSON and figures (default: the run's)")
    progress: bool = option(True, "no progress bar")
    threads: int | None = option(None, THREADS_HELP, check=optional(positive))


@dataclass
class EvaluationReport:
    """What :func:`evaluate_run` computed and wrote.

    :param summary: :func:`summarize`'s dict with what was evaluated (``data``, ``split``, ``model``,
        ``objective``, ``step``, ``decoder``, ``clip_denoised``).
    :param estimates: the other estimators' result dicts by name (the probability-flow ODE, the
        importance-weighted bound), as :func:`~pyro_ddpm.ode.ode_likelihood` and
        :func:`~pyro_ddpm.importance_weighted.importance_weighted` return them.
    :param paths: the files written, by kind (``netcdf``, ``json``, ``ode``, ``iw``, the figures').
    :param idata: the per-image, per-term bound (:func:`bound`).
    """

    summary: dict
    estimates: dict[str, dict]
    paths: dict[str, Path]
    idata: az.InferenceData


@dataclass
class _Subject:
    """A model and guide to evaluate, the data set to score, where they came from and where results go."""

    model: object
    guide: object
    dataset: object
    source: dict  # model, objective, step, checkpoint
    out: Path


def evaluate_run(run, options: Evaluation | None = None, *, trust_code: bool = False) -> EvaluationReport:
    """Evaluate a trained run -- a run directory or checkpoint file -- or, with ``options.diffusers`` (and no
    ``run``), a diffusers pipeline: the bound term by term on the data split, the other estimators asked for,
    written as ``bound_SPLIT.nc`` / ``.json``, ``ode_SPLIT.json``, ``iw_SPLIT.json`` and figures in
    ``options.out`` (default: the run's folder). Errors name the command's flags; a run that has not finished
    training is said on stderr. :func:`format_report` gives the printed table.

    :param trust_code: allow importing a program class the checkpoint names that is not registered.
    """
    options = options if options is not None else Evaluation()
    check_all(options, as_flags=True)
    device = check_device(options.device)
    if (run is None) == (options.diffusers is None):
        raise ValueError("evaluate: give a run directory (or checkpoint) or --diffusers DIR, not both")
    with torch_threads(options.threads):
        if options.diffusers is not None:
            subject = _pipeline_subject(options, device, trust_code)
        else:
            subject = _run_subject(run, options, device, trust_code)
        return _evaluate(subject, options, device)


def _pipeline_subject(options: Evaluation, device: str, trust_code: bool) -> _Subject:
    """The saved diffusers pipeline ``options.diffusers`` as a model and guide, with the data to score."""
    if options.data is None:
        raise ValueError("evaluate --diffusers: name the data to score with --data (a data set or a path)")
    out = check_directory(options.out or options.diffusers, "evaluation output folder", create=False)
    dataset = datasets.load(options.data, download=options.download)
    model, guide = from_diffusers_pipeline(options.diffusers, levels=dataset.levels)
    model, guide = model.to(device), guide.to(device)
    if options.clip_denoised:
        model = model.with_clipping()
    if options.likelihood is not None:
        model = model.with_likelihood(by_name(options.likelihood, dataset, trust_code=trust_code))
    source = {
        "model": f"diffusers pipeline {options.diffusers}",
        "objective": "elsewhere",
        "step": None,
        "checkpoint": str(options.diffusers),
    }
    return _Subject(model, guide, dataset, source, out)


def _run_subject(run, options: Evaluation, device: str, trust_code: bool) -> _Subject:
    """The run's model and guide, checked against the data set it is evaluated on."""
    state, run_dir = load_run(run)
    # before computing anything; a missing output folder is made only when the results are written
    out = check_directory(options.out or run_dir, "evaluation output folder", create=False)
    dataset = datasets.load(_data_spec(state.data, options), download=options.download)
    state.check_data(dataset.shape, dataset.levels, what=f"data set {dataset.name!r}")
    if options.T is not None and options.T != int(state.config["T"]):
        raise ValueError(f"schedule mismatch: the checkpoint has T = {state.config['T']}, --T asked {options.T}")
    likelihood = None if options.likelihood is None else by_name(options.likelihood, dataset, trust_code=trust_code)
    model, guide = state.build(
        device=device, trust_code=trust_code, clip_denoised=options.clip_denoised, likelihood=likelihood
    )
    source = {
        "model": state.programs["model"]["class"],
        "objective": state.config["objective"],
        "step": state.step,
        "checkpoint": str(resolve(run)),
    }
    return _Subject(model, guide, dataset, source, out)


def _data_spec(stored: dict, options: Evaluation) -> str:
    """The data to score: ``--data``, else the set the run was trained on (from its files when they are here)."""
    if options.data:
        return options.data
    if options.download and stored.get("source") and not Path(stored["source"]).exists():
        return stored["name"]  # the files it was trained on are not on this machine: fetch into its cache
    return f"{stored['name']}:{stored['source']}" if stored.get("source") else stored["name"]


def _evaluate(subject: _Subject, options: Evaluation, device: str) -> EvaluationReport:
    """The bound on the split's first ``limit`` images, the other estimates on the same images, written."""
    model, guide, source = subject.model, subject.guide, subject.source
    x = getattr(subject.dataset, options.split)[: options.limit].to(device)
    idata = bound(
        model, guide, x, draws=options.draws, max_batch=options.max_batch, seed=options.seed, progress=options.progress
    )
    idata.bound.attrs.update(
        split=options.split,
        data=subject.dataset.name,
        clip_denoised=int(options.clip_denoised),
        decoder=repr(model.likelihood),
        checkpoint=source["checkpoint"],
        step=-1 if source["step"] is None else source["step"],
        objective=source["objective"],
    )
    summary = summarize(idata)
    summary.update(
        split=options.split,
        data=subject.dataset.name,
        clip_denoised=options.clip_denoised,
        decoder=repr(model.likelihood),
        **{k: source[k] for k in ("objective", "step", "model")},
    )
    estimates = _other_estimates(model, guide, x, options)
    paths = _write(idata, summary, estimates, subject.out, options)
    return EvaluationReport(summary, estimates, paths, idata)


def _other_estimates(model, guide, x: torch.Tensor, options: Evaluation) -> dict[str, dict]:
    """The probability-flow ODE's bound and the importance-weighted bound, where asked for."""
    estimates = {}
    if options.ode:
        estimates[ODE_ESTIMATE] = ode_likelihood(
            model,
            x,
            method=options.ode_method,
            steps=options.ode_steps,
            divergence=options.divergence,
            probes=options.probes,
            seed=options.seed,
        )
    if options.particles is not None:
        estimates[f"importance-weighted, K = {options.particles}"] = importance_weighted(
            model, guide, x, particles=options.particles, seed=options.seed
        )
    return estimates


def _write(idata, summary: dict, estimates: dict[str, dict], out: Path, options: Evaluation) -> dict[str, Path]:
    """``bound_SPLIT.nc`` and ``.json``, each estimate's JSON and (unless switched off) the figures."""
    stem = f"bound_{options.split}"
    paths = save(idata, summary, out, stem)
    for name, result in estimates.items():
        kind = "ode" if name == ODE_ESTIMATE else "iw"
        paths[kind] = atomic_write(
            out / f"{kind}_{options.split}.json",
            lambda f, r=result: f.write(json.dumps(_json_ready(r), indent=2).encode()),
        )
    if options.figures:
        paths.update(save_all(idata, out, stem))
    return paths


def _json_ready(result: dict) -> dict:
    """A result dict of the ODE or importance-weighted estimator with its arrays as lists (for JSON)."""
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.items()}


def format_report(report: EvaluationReport) -> str:
    """The evaluation as ``pyro-ddpm evaluate`` prints it: the bound's table (:func:`format_summary`) under a
    line saying what was evaluated, the other estimates, and the files written."""
    s = report.summary
    header = (
        f"{s['data']} {s['split']} split, {s['model']}, objective {s['objective']}, step {s['step']}; "
        f"decoder {s['decoder']}, clip_denoised={s['clip_denoised']}"
    )
    lines = [format_summary(s, header)]
    if report.estimates:
        lines.append("\nother estimators on the same images (mean, s.e. over images):")
        lines += [_estimator_line(name, result) for name, result in report.estimates.items()]
        if ODE_ESTIMATE in report.estimates:
            st = report.estimates[ODE_ESTIMATE]["settings"]
            lines.append(
                f"  ODE: {st['method']} {st['steps'] or ''} steps, divergence {st['divergence']}, dequantized "
                f"{st['dequantize']} (an upper bound on the discrete NLL)"
            )
    lines.append("written: " + ", ".join(str(p) for p in report.paths.values()))
    return "\n".join(lines)


def _estimator_line(name: str, result: dict) -> str:
    unit = result.get("unit", "bits_per_dim")
    label = stats.unit_label(unit == "bits_per_dim")
    return f"{name:<28} {result[unit]:>10.5f} {result['se']:>9.5f} {label}  ({result['seconds']:.1f} s)"
