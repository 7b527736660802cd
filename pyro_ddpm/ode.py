"""The probability-flow ODE likelihood (Song et al. 2021) of a DDPM's eps network: a second estimator beside the bound.

The ODE (DDIM's, Song, Meng, Ermon 2021, Eq. 14). With y = x / sqrt(abar) and
sigma = sqrt((1 - abar) / abar), the forward marginals of Eq. 4 become y_sigma = x_0 + sigma eps, and

    dy/dsigma = eps_theta(x, t(sigma)),   x = y / sqrt(1 + sigma^2)                          (1)

is their probability flow: dy/dsigma = -sigma grad_y log p_sigma(y) = E[eps | y_sigma = y], the
quantity eps_theta estimates (Ho et al. Eq. 12). 1 + sigma^2 = 1 / abar, so x = sqrt(abar) y.

Continuous time. The network was trained at the integers t = 1..T. Between them the schedule is
interpolated by -log abar(t) piecewise linear through the points -log abar_k, k = 0..T (abar_0 = 1;
beta constant on each unit interval), so t(sigma) solves log(1 + sigma^2) = -log abar(t); the network
is called with that *float* t (in [0, T]; an adapter's zero-based network sees t - 1, so values in
[-1, 0) on the first interval). At the integers sigma(t) is the schedule's sigma_t exactly.

Log-density. Along (1) the instantaneous change of variables (Chen et al. 2018) gives
d log p_sigma(y(sigma)) / dsigma = -div_y eps_theta, so with sigma_T = sigma(T),

    log p(x_0) = log p_T(y(sigma_T)) + int_{sigma_min}^{sigma_T} div_y eps_theta dsigma
                 + (D / 2) log(1 + sigma_min^2)                                              (2)

The last term is the Jacobian of x <-> y at the start: the data enter as x_{t_min}, so y = x_0 sqrt(1 +
sigma_min^2); at the default t_min = 0 (sigma_min = 0) x_0 = y_0 and it vanishes. The prior is the
model's own, p(x_T) = N(0, I) (the bound's L_T uses the same): in y, N(0, (1 + sigma_T^2) I) =
N(0, I / abar_T), i.e. log p_T(y) = log N(sqrt(abar_T) y; 0, I) + (D / 2) log abar_T. Any prior gives
a normalized density (the flow is a bijection); this one makes the two estimators share p(x_T).

Integration variable. rho in [rho_min, 1] with sigma = sigma_c expm1(rho L), L = log1p(sigma_T /
sigma_c): uniform steps in log(sigma_c + sigma), fine near the data (sigma << sigma_c), logarithmic
beyond; dsigma/drho = L (sigma + sigma_c) is smooth, and the schedule's kinks enter only through the
network's t. sigma_c defaults to sigma_1 (the schedule's first step).

Divergence. Exact (D backward passes per evaluation, for small D) or Hutchinson's estimator
z^T (d eps / d y) z with one Rademacher or Gaussian probe z per image held fixed along the solve
(``probes`` averages several): unbiased for the integral in (2), so for log p.

Discrete data (K levels, bin width Delta = 2 / (K - 1)). Uniform dequantization x~ = x_0 + (u - 1/2)
Delta, u ~ U[0, 1)^D (x_0 + u' / (K - 1), u' ~ U[-1, 1)), and by Jensen

    -log P(x_0) = -log int_bin p  <=  E_u[-log p(x~)] - D log Delta                         (3)

an upper bound on the discrete NLL of the flow model (the bin volume Delta^D enters as -D log Delta);
bits/dim = (3) / (D ln 2). Its Monte-Carlo error (dequantization and probes) is reported as the
standard error over images, and (several draws) the noise-only part, as :mod:`pyro_ddpm.evaluate` does.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np
import torch
from torch import nn

from pyro_ddpm import grid, stats
from pyro_ddpm.adapters import EpsNetwork, to_grid
from pyro_ddpm.likelihoods import check_images
from pyro_ddpm.models import LearnedVarianceReverseProcess, ReverseProcess
from pyro_ddpm.programs import ReverseProgram, require

DIVERGENCES = ("auto", "exact", "rademacher", "gaussian")
EXACT_MAX_DIMS = 16  # divergence="auto": exact up to this many dimensions, Rademacher beyond


class ContinuousSchedule:
    """A discrete schedule at real t in [0, T]: -log abar(t) piecewise linear through the integers.

    :param schedule: a :class:`~pyro_ddpm.schedule.Schedule` (its ``abar``, t = 0..T, float64).
    """

    def __init__(self, schedule):
        abar = schedule.abar.detach().cpu().double().numpy()
        self.T = len(abar) - 1
        self.gamma = -np.log(abar)  # gamma_0 = 0, strictly increasing since every beta_t > 0
        self.steps = np.arange(self.T + 1, dtype=np.float64)

    def gamma_of_t(self, t: float) -> float:
        """-log abar(t)."""
        return float(np.interp(t, self.steps, self.gamma))

    def abar_of_t(self, t: float) -> float:
        return math.exp(-self.gamma_of_t(t))

    def sigma_of_t(self, t: float) -> float:
        """sigma(t) = sqrt((1 - abar(t)) / abar(t)) = sqrt(expm1(gamma(t)))."""
        return math.sqrt(math.expm1(self.gamma_of_t(t)))

    def t_of_sigma(self, sigma: float) -> float:
        """The inverse: the t with log(1 + sigma^2) = gamma(t)."""
        return float(np.interp(math.log1p(sigma * sigma), self.gamma, self.steps))


def _network(eps_or_model, schedule):
    """(eps function, schedule, data shape or None) for a model or a bare network."""
    if isinstance(eps_or_model, ReverseProgram):
        require(eps_or_model, "ode", "the probability-flow ODE likelihood")
    if isinstance(eps_or_model, ReverseProcess):
        model = eps_or_model
        # The network's output is eps (then v) only if the class reads it as its base classes do.
        base = LearnedVarianceReverseProcess if isinstance(model, LearnedVarianceReverseProcess) else ReverseProcess
        for name in ("transition", "predict_x0", "eps_hat", "mean", "split"):
            if getattr(type(model), name, None) is not getattr(base, name, None):
                raise ValueError(
                    f"ode: {type(model).__name__} reads its network differently from {base.__name__} "
                    f"(its {name}() is its own: it may predict x_0 or v); the ODE needs an eps network: "
                    f"pass one with its schedule, ode_likelihood(eps, x0, schedule)"
                )
        if schedule is not None and schedule is not model.schedule:
            model.schedule.check_matches(schedule.betas, what="schedule given")
        return model.eps, model.schedule, model.shape
    if schedule is None:
        raise ValueError("ode: give the schedule of a bare eps network: ode_likelihood(eps, schedule, x0)")
    if not callable(eps_or_model):
        raise ValueError(f"ode: expected a ReverseProcess or a callable eps(x_t, t), got {type(eps_or_model).__name__}")  # noqa: TRY004
    return eps_or_model, schedule, getattr(eps_or_model, "shape", None)


def _net_dtype(net, default: torch.dtype) -> torch.dtype:
    if isinstance(net, nn.Module) and not isinstance(net, EpsNetwork):  # an EpsNetwork casts by itself
        for p in net.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
    return default


def _eps_only(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """eps from a network output: the tensor itself, or the first half of 2C channels (eps, v)."""
    if out.shape == x.shape:
        return out
    if (
        out.dim() == x.dim()
        and out.shape[0] == x.shape[0]
        and out.shape[1] == 2 * x.shape[1]
        and out.shape[2:] == x.shape[2:]
    ):
        return out.chunk(2, dim=1)[0]
    raise ValueError(
        f"ode: the network returned shape {tuple(out.shape)} for input {tuple(x.shape)}; expected the "
        f"input's shape (eps) or twice its channels (eps, v)"
    )


def _generator(seed: int, draw: int, image: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(draw), int(image), int(stream)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _rk4(f, state, points):
    """Classic fourth-order Runge-Kutta on the fixed grid ``points`` (4 evaluations per step); ``state`` is a tuple."""
    for a, b in itertools.pairwise(points):
        h = b - a

        def add(s, k, c):
            return tuple(si + c * ki for si, ki in zip(s, k))

        k1 = f(a, state)
        k2 = f(a + h / 2, add(state, k1, h / 2))
        k3 = f(a + h / 2, add(state, k2, h / 2))
        k4 = f(b, add(state, k3, h))
        state = tuple(s + h / 6 * (q1 + 2 * q2 + 2 * q3 + q4) for s, q1, q2, q3, q4 in zip(state, k1, k2, k3, k4))
    return state


class _Counter:
    def __init__(self):
        self.calls = self.backward = self.evaluations = 0


@dataclasses.dataclass(frozen=True)
class ODEOptions:
    """How :func:`ode_likelihood` and :func:`log_density` solve the ODE and estimate its divergence.

    :param divergence: ``auto`` (exact up to :data:`EXACT_MAX_DIMS` dimensions, else Rademacher),
        ``exact``, ``rademacher`` or ``gaussian`` (Hutchinson's estimator with ``probes`` probes per image).
    :param draws: independent dequantization (and probe) draws per image.
    :param method: ``rk4`` (this module's fixed grid of ``steps`` steps in rho) or a torchdiffeq method
        (``dopri5``, ... with ``rtol``/``atol``; ``euler``/``midpoint`` with ``steps``).
    :param t_min: the time at which the data enter (as x_{t_min}); 0 = the data themselves.
    :param sigma_c: the integration grid's scale (default sigma_1, see the module docstring).
    :param max_batch: images per solve. With ``rk4`` the results do not depend on it; adaptive methods
        choose one step size per batch.
    :param seed: seeds each image's dequantization noise and probes (with the draw and the image's id).
    :param dtype: the solver's dtype (the network runs in its own parameters' dtype).
    """

    divergence: str = "auto"
    probes: int = 1
    draws: int = 1
    method: str = "rk4"
    steps: int = 100
    rtol: float = 1e-5
    atol: float = 1e-5
    t_min: float = 0.0
    sigma_c: float | None = None
    max_batch: int = 256
    seed: int = 0
    dtype: torch.dtype = torch.float64

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"ode: unknown divergence {self.divergence!r}; choose one of {DIVERGENCES}")
        if self.draws < 1 or self.probes < 1 or self.max_batch < 1:
            raise ValueError(
                f"ode: draws, probes and max_batch must be positive, got {self.draws}, {self.probes}, {self.max_batch}"
            )

    def grid_scale(self, cs: ContinuousSchedule) -> float:
        """sigma_c: the integration grid's scale, ``sigma_c`` when given, else the schedule's sigma_1."""
        return float(self.sigma_c) if self.sigma_c is not None else cs.sigma_of_t(1.0)

    @classmethod
    def of(cls, options: ODEOptions | None, settings: dict) -> ODEOptions:
        """``options`` (default: the defaults) with the fields named in ``settings`` replaced."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"ode: unknown settings {unknown}; the options are the fields of ODEOptions")
        return dataclasses.replace(options if options is not None else cls(), **settings)

    def divergence_for(self, dims: int) -> str:
        """The divergence estimator for data of ``dims`` dimensions (``auto`` resolved)."""
        if self.divergence != "auto":
            return self.divergence
        return "exact" if dims <= EXACT_MAX_DIMS else "rademacher"

    @property
    def fixed_grid(self) -> bool:
        """Whether the method takes ``steps`` (a fixed grid) rather than tolerances."""
        return self.method in ("rk4", "euler", "midpoint")


class _Flow:
    """The right-hand side of Eq. (1) and of the log-density's change in rho, for one batch of B points of D
    dimensions: ``flow(rho, (y, ell)) -> (dy/drho, d ell/drho)``."""

    def __init__(self, net, cs: ContinuousSchedule, options: ODEOptions, x: torch.Tensor, probe_noise, counter):
        self.net, self.cs, self.counter = net, cs, counter
        self.dtype, self.device = options.dtype, x.device
        self.net_dtype = _net_dtype(net, options.dtype)
        self.B, self.D = x.shape[0], int(np.prod(x.shape[1:]))
        self.sigma_T, self.sigma_min = cs.sigma_of_t(cs.T), cs.sigma_of_t(options.t_min)
        self.sc = options.grid_scale(cs)
        self.L = math.log1p(self.sigma_T / self.sc)
        self.rho_min = math.log1p(self.sigma_min / self.sc) / self.L
        self.probe_noise = probe_noise  # None: the exact divergence

    def __call__(self, rho, state):
        """(dy/drho, d ell/drho): Eq. (1) and the divergence, times dsigma/drho = L (sigma + sigma_c)."""
        rho = float(rho)
        sigma = self.sc * math.expm1(rho * self.L)
        dsigma = self.L * (sigma + self.sc)
        t = torch.full((self.B,), self.cs.t_of_sigma(sigma), dtype=self.net_dtype, device=self.device)
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            xin = (y / math.sqrt(1.0 + sigma * sigma)).to(self.net_dtype)
            f = _eps_only(self.net(xin, t), xin).to(self.dtype)
            self.counter.calls += 1
            div = self._divergence(f.reshape(self.B, self.D), y)
        self.counter.evaluations += 1
        return f.detach() * dsigma, div.detach() * dsigma

    def _divergence(self, flat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """div_y f per point: D backward passes (exact), or Hutchinson's z^T (df/dy) z averaged over the probes."""
        B, D = self.B, self.D
        div = torch.zeros(B, dtype=self.dtype, device=self.device)
        if self.probe_noise is None:
            for i in range(D):
                g = torch.autograd.grad(flat[:, i].sum(), y, retain_graph=i < D - 1)[0]
                div = div + g.reshape(B, D)[:, i]
            self.counter.backward += D
            return div
        probes = self.probe_noise.shape[0]
        for k in range(probes):
            z = self.probe_noise[k]
            g = torch.autograd.grad((flat * z).sum(), y, retain_graph=k < probes - 1)[0]
            div = div + (g.reshape(B, D) * z).sum(1)
        self.counter.backward += probes
        return div / probes

    def log_prior(self, y_T: torch.Tensor) -> torch.Tensor:
        """log p_T(y_T): the prior N(0, I) of x_T = sqrt(abar_T) y_T, in y."""
        var_T = 1.0 + self.sigma_T * self.sigma_T
        D = self.D
        return -0.5 * (y_T.reshape(self.B, D) ** 2).sum(1) / var_T - 0.5 * D * math.log(2 * math.pi * var_T)


def _integrate(flow: _Flow, state, options: ODEOptions):
    """The state (y, ell) carried from rho_min to 1 by ``options.method``."""
    if options.method == "rk4":
        if int(options.steps) < 1:
            raise ValueError(f"ode: steps must be positive, got {options.steps}")
        return _rk4(flow, state, np.linspace(flow.rho_min, 1.0, int(options.steps) + 1))
    try:
        from torchdiffeq import odeint
    except ImportError as e:
        raise ValueError(f'ode: method {options.method!r} needs torchdiffeq: pip install -e ".[ode]" ({e})') from None
    span = torch.tensor([flow.rho_min, 1.0], dtype=options.dtype, device=flow.device)
    step = {"step_size": (1.0 - flow.rho_min) / int(options.steps)} if options.method in ("euler", "midpoint") else None
    sol = odeint(flow, state, span, method=options.method, rtol=options.rtol, atol=options.atol, options=step)
    return sol[0][-1], sol[1][-1]


def log_density(
    eps_or_model,
    x: torch.Tensor,
    schedule=None,
    options: ODEOptions | None = None,
    *,
    probe_noise: torch.Tensor | None = None,
    counter: _Counter | None = None,
    **settings,
) -> torch.Tensor:
    """log p(x) of the probability-flow model by Eq. (2) of the module docstring: a (B,) tensor, nats.

    :param x: points ``(B, *shape)``, any real values (a dequantized image, or continuous data).
    :param options: an :class:`ODEOptions` (its ``divergence``, ``probes``, ``method``, ``steps``, ``rtol``,
        ``atol``, ``t_min``, ``sigma_c`` and ``dtype`` apply); ``settings`` replace single fields, e.g.
        ``log_density(eps, x, schedule, steps=50)``.
    :param probe_noise: the Hutchinson probes, (probes, B, D), for a reproducible estimate; without it the
        global RNG draws them.
    """
    options = ODEOptions.of(options, settings)
    net, schedule, _ = _network(eps_or_model, schedule)
    cs = ContinuousSchedule(schedule)
    if not 0.0 <= options.t_min < cs.T:
        raise ValueError(f"ode: t_min must lie in [0, T) = [0, {cs.T}), got {options.t_min}")
    B, D = x.shape[0], int(np.prod(x.shape[1:]))
    divergence = options.divergence_for(D)
    if divergence != "exact":
        if probe_noise is None:
            z = torch.randn(options.probes, B, D, dtype=options.dtype, device=x.device)
            probe_noise = z.sign() if divergence == "rademacher" else z
        probe_noise = probe_noise.to(dtype=options.dtype, device=x.device)
    else:
        probe_noise = None
    flow = _Flow(net, cs, options, x, probe_noise, counter if counter is not None else _Counter())
    y0 = x.to(options.dtype) * math.sqrt(1.0 + flow.sigma_min * flow.sigma_min)
    with torch.no_grad():
        y_T, ell = _integrate(flow, (y0, torch.zeros(B, dtype=options.dtype, device=x.device)), options)
    return flow.log_prior(y_T) + ell + 0.5 * D * math.log1p(flow.sigma_min * flow.sigma_min)


def ode_likelihood(
    eps_or_model,
    x0: torch.Tensor,
    schedule=None,
    levels="auto",
    dequantize: bool = True,
    options: ODEOptions | None = None,
    image_ids=None,
    **settings,
) -> dict:
    """The probability-flow likelihood of ``x0`` per image, with bits/dim and standard errors.

    :param eps_or_model: a :class:`~pyro_ddpm.models.ReverseProcess` (or the learned-variance one:
        its eps half is used) or a bare network ``eps(x_t, t)`` (then ``schedule`` is required). The
        network is called with a *float* t in [0, T] (see the module docstring).
    :param x0: ``(N, *shape)`` images on the ``levels``-level grid of [-1, 1] (integer levels, e.g. uint8,
        are mapped by :func:`pyro_ddpm.adapters.to_grid`); ``levels`` 0 or None for continuous data (no
        dequantization; the result is a log-density, in nats/dim). ``"auto"``: the model's decoder's
        ``levels`` (0 for a continuous decoder), 256 for a bare network.
    :param dequantize: uniform dequantization, Eq. (3) (an upper bound on the discrete NLL). Without
        it the value is -log p(x0) - D log Delta at the grid points: an approximation, not a bound.
    :param options: an :class:`ODEOptions` (solver, divergence, draws, batching, seed, dtype); ``settings``
        replace single fields, e.g. ``ode_likelihood(model, x0, steps=50, seed=1)``.
    :param image_ids: identifiers seeding each image's noise (default 0..N-1).
    :returns: dict with ``nats`` (N,) per image (mean over draws; the bound (3) for discrete data,
        -log p for continuous), ``nats_draws`` (draws, N), ``log_density`` (draws, N) of the points
        scored, ``bits_per_dim`` (discrete) or ``nats_per_dim`` (continuous) with ``se`` (over images)
        and ``se_noise`` (draws > 1) in that unit, ``bound`` (whether the value is an upper bound),
        ``settings``, ``network_calls``, ``backward_passes``, ``function_evaluations``, ``seconds``.
    """
    start = time.perf_counter()
    if not torch.is_tensor(x0) or isinstance(schedule, torch.Tensor):
        raise ValueError("ode: call ode_likelihood(eps_or_model, x0, schedule=None, ...) with x0 an (N, *shape) tensor")
    net, schedule, shape = _network(eps_or_model, schedule)
    levels = _levels(eps_or_model, levels)
    x0 = _checked_points(x0, shape, levels)
    options = ODEOptions.of(options, settings)
    ids = list(range(x0.shape[0])) if image_ids is None else [int(i) for i in image_ids]
    counter = _Counter()
    logp = _log_densities(net, schedule, x0, ids, levels if dequantize else 0, options, counter)
    out = _summary(logp, int(np.prod(x0.shape[1:])), levels, dequantize, counter)
    out["settings"] = _settings(options, options.divergence_for(out["dims"]), levels, dequantize, schedule)
    out["seconds"] = time.perf_counter() - start
    return out


def _levels(eps_or_model, levels) -> int:
    """K of the data (0 for continuous data), ``"auto"`` read off the model's decoder (256 for a bare network)."""
    if isinstance(levels, str):
        if levels != "auto":
            raise ValueError(f"ode: levels must be an integer K >= 2, 0/None (continuous) or 'auto', got {levels!r}")
        likelihood = getattr(eps_or_model, "likelihood", None)
        if likelihood is None:
            return 256
        return int(getattr(likelihood, "levels", 256)) if getattr(likelihood, "discrete", True) else 0
    return 0 if levels is None else int(levels)


def _checked_points(x0: torch.Tensor, shape, levels: int) -> torch.Tensor:
    """``x0`` checked against the model's data shape and the grid (integer levels mapped onto it)."""
    if x0.dim() < 2:
        raise ValueError(f"ode: x0 must be (N, *shape), got shape {tuple(x0.shape)}")
    if shape is not None and tuple(x0.shape[1:]) != tuple(shape):
        raise ValueError(
            f"ode: x0 has shape {tuple(x0.shape)}, but the model's data shape is (N, {', '.join(map(str, shape))})"
        )
    if levels and not x0.dtype.is_floating_point:
        x0 = to_grid(x0, levels)
    check_images(x0, levels or None)
    return x0


def _log_densities(net, schedule, x0, ids, dequantize_levels: int, options: ODEOptions, counter) -> torch.Tensor:
    """log p of every image and draw, (draws, N) float64: batches of ``max_batch`` images, each image's
    dequantization noise (on a grid of ``dequantize_levels`` levels; 0: none) and probes from its own seeds."""
    N, D = x0.shape[0], int(np.prod(x0.shape[1:]))
    divergence = options.divergence_for(D)
    solve = dataclasses.replace(options, divergence=divergence)
    logp = torch.zeros(options.draws, N, dtype=torch.float64)
    for d in range(options.draws):
        for i in range(0, N, options.max_batch):
            x = x0[i : i + options.max_batch].to(options.dtype)
            rows = ids[i : i + x.shape[0]]
            if dequantize_levels:
                x = x + (_uniform_noise(x, rows, d, options).to(x.device) - 0.5) * grid.width(dequantize_levels)
            noise = _probes(rows, d, D, divergence, options)
            density = log_density(net, x, schedule, solve, probe_noise=noise, counter=counter)
            logp[d, i : i + x.shape[0]] = density.double().cpu()
    return logp


def _uniform_noise(x: torch.Tensor, rows, draw: int, options: ODEOptions) -> torch.Tensor:
    """u ~ U[0, 1) per image of the batch ``x``, each from the generator of (seed, draw, image, 0)."""
    return torch.stack(
        [torch.rand(x.shape[1:], generator=_generator(options.seed, draw, r, 0), dtype=options.dtype) for r in rows]
    )


def _probes(rows, draw: int, D: int, divergence: str, options: ODEOptions) -> torch.Tensor | None:
    """Hutchinson probes (probes, B, D) from the generators of (seed, draw, image, 1); None for the exact divergence."""
    if divergence == "exact":
        return None
    z = torch.stack(
        [
            torch.randn(options.probes, D, generator=_generator(options.seed, draw, r, 1), dtype=options.dtype)
            for r in rows
        ],
        1,
    )
    return z.sign() if divergence == "rademacher" else z


def _summary(logp: torch.Tensor, D: int, levels: int, dequantize: bool, counter: _Counter) -> dict:
    """Per-image nats (Eq. (3) for grid data), the mean in the bound's unit with its standard errors, the work."""
    discrete = levels != 0
    nats_draws = -logp - (D * math.log(grid.width(levels)) if discrete else 0.0)
    unit = stats.nats_per_unit(D, discrete)
    per_image = nats_draws.mean(0)
    mean, se = stats.mean_se(per_image / unit)
    out = {
        "nats": per_image.numpy(),
        "nats_draws": nats_draws.numpy(),
        "log_density": logp.numpy(),
        "discrete": discrete,
        "bound": bool(discrete and dequantize) or not discrete,
        "unit": stats.unit(discrete),
        stats.unit(discrete): mean,
        "se": se,
        "images": logp.shape[1],
        "dims": D,
        "network_calls": counter.calls,
        "backward_passes": counter.backward,
        "function_evaluations": counter.evaluations,
    }
    if logp.shape[0] > 1:
        out["se_noise"] = stats.noise_se(nats_draws / unit)
    return out


def _settings(options: ODEOptions, divergence: str, levels: int, dequantize: bool, schedule) -> dict:
    """What the result was computed with, as stored beside it."""
    cs = ContinuousSchedule(schedule)
    return {
        "method": options.method,
        "steps": int(options.steps) if options.fixed_grid else None,
        "rtol": options.rtol if not options.fixed_grid else None,
        "atol": options.atol if not options.fixed_grid else None,
        "divergence": divergence,
        "probes": options.probes if divergence != "exact" else None,
        "draws": options.draws,
        "levels": levels,
        "dequantize": bool(levels and dequantize),
        "t_min": float(options.t_min),
        "T": cs.T,
        "sigma_T": cs.sigma_of_t(cs.T),
        "sigma_c": options.grid_scale(cs),
        "prior": "p(x_T) = N(0, I) (the model's)",
        "dtype": str(options.dtype).replace("torch.", ""),
        "seed": options.seed,
        "max_batch": options.max_batch,
    }
