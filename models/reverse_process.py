"""The reverse process p_theta(x_{0:T}) of Ho, Jain, Abbeel (2020) as a Pyro model.

    p(x_T) = N(0, I),   p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)            (Eq. 1)
    mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(alpha_t)   (Eq. 11)
    p_theta(x_0 | x_1) = the likelihood at mean mu_theta(x_1, 1), scale sigma_1              (Eq. 13)

:meth:`ReverseProcess.mean_and_scale` is the one definition of p_theta(x_{t-1} | x_t)'s mean and scale;
the program's three distributions (:meth:`~ReverseProcess.p_xT`, :meth:`~ReverseProcess.p_prev`,
:meth:`~ReverseProcess.p_x0`) are built from it, and the chain form, the per-timestep training form and
ancestral sampling are derived from them by :class:`~pyro_ddpm.programs.ReverseProgram`. DDIM and
respacing read :meth:`ReverseProcess.transition`. Site names and shapes follow :mod:`pyro_ddpm.protocol`.
"""

from __future__ import annotations

import copy

import pyro.distributions as dist
import torch
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.elbo import simple_weights
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, GaussianLikelihood
from pyro_ddpm.programs import ReverseProgram
from pyro_ddpm.protocol import DataSpec
from pyro_ddpm.registry import MODELS
from pyro_ddpm.schedule import Schedule, at


@MODELS.register
class ReverseProcess(ReverseProgram):
    """The generative model: a Markov chain from N(0, I) down to the data through eps_theta.

    :param eps: any ``nn.Module`` ``eps(x_t, t)`` with integer ``t`` in 1..T returning a tensor
        shaped like ``x_t`` (with :meth:`output_channels` channels).
    :param schedule: the :class:`~pyro_ddpm.schedule.Schedule` (shared with the guide).
    :param variance: one of :attr:`variances`: ``"large"`` (sigma_t^2 = beta_t) or ``"small"``
        (sigma_t^2 = beta_tilde_t).
    :param likelihood: the decoder p_theta(x_0 | x_1); default the discretized Gaussian with 256 levels.
    :param shape: the shape of one datum; default ``eps.shape``.
    :param clip_denoised: centre the mean on the posterior mean at the prediction of x_0 clipped to
        [-1, 1] (the official evaluation's ``clip_denoised=True``); see :meth:`with_clipping`.

    Its config is the constructor's arguments, with the variance and shape it resolved, other than the
    network, schedule and likelihood it is built around (:attr:`built_around`) and ``clip_denoised``, a
    choice made where the model is used (:attr:`chosen_at_use`):
    ``Model.from_config(eps=..., schedule=..., likelihood=..., **model.config())`` rebuilds it.

    What the class declares, read by the trainer and the command line (nothing outside names a variant):

    - :attr:`variances`: the variance rules it implements, the first being the default;
    - :attr:`objectives`: what it can be trained on (:meth:`training_program` builds each);
    - :meth:`output_channels`: the network output it needs for given data.
    """

    family = "gaussian"
    chosen_at_use = ("clip_denoised",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "transition" in vars(cls):  # the program's distributions are built from mean_and_scale, not from it
            raise TypeError(
                f"{cls.__name__} overrides transition(): define mean_and_scale() (or mean() and scale()) instead, "
                "from which transition(), p_prev() and p_x0() all follow"
            )
        if ("p_prev" in vars(cls) or "p_x0" in vars(cls)) and "p_step" not in vars(cls):
            # ReverseProcess.p_step builds both distributions from mean_and_scale; a class that redefines one
            # of them is scored through its own definitions (the program's generic p_step calls them)
            cls.p_step = ReverseProgram.p_step

    variances: tuple[str, ...] = ("large", "small")
    objectives: tuple[str, ...] = ("elbo", "simple")
    capabilities: tuple[str, ...] = ("ddim", "respace", "ode", "progressive")

    def __init__(
        self,
        eps: nn.Module,
        schedule: Schedule,
        variance: str | None = None,
        likelihood=None,
        shape=None,
        clip_denoised: bool = False,
    ):
        super().__init__()
        self.eps = eps
        self.schedule = schedule
        variance = self.variances[0] if variance is None else variance
        self.check_variance(schedule, variance)
        self.variance = variance
        self.likelihood = likelihood if likelihood is not None else DiscretizedGaussianLikelihood(256)
        shape = shape if shape is not None else getattr(eps, "shape", None)
        if shape is None:
            raise ValueError(f"{type(self).__name__}: give the data shape (the network has no .shape attribute)")
        self.shape = tuple(int(s) for s in shape)
        # the data this model describes, fixed at construction (a training surrogate may swap the decoder)
        self.data = DataSpec(self.shape, int(getattr(self.likelihood, "levels", 0) or 0))
        self.clip_denoised = bool(clip_denoised)
        self.autocast = None  # e.g. torch.bfloat16: the network (only) runs under torch.autocast
        self.record_config(variance=variance, shape=self.shape)

    @classmethod
    def output_channels(cls, data: DataSpec) -> int:
        """Channels the network must return for data ``data`` (see :class:`~pyro_ddpm.protocol.DataSpec`):
        eps_theta is shaped like its input here. Subclasses whose network outputs more return more."""
        return data.channels

    @classmethod
    def network_config(cls, preset: dict, data: DataSpec) -> dict:
        """The network preset (a ``pyro_ddpm.nets`` config) with the output this class needs for ``data``."""
        return dict(preset, out_channels=cls.output_channels(data))

    @classmethod
    def check_variance(cls, schedule, variance: str) -> None:
        """Raise ValueError unless ``variance`` is one of :attr:`variances`."""
        if variance not in cls.variances:
            raise ValueError(f"{cls.__name__}: unknown variance {variance!r}; it implements {list(cls.variances)}")

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def sigma2(self) -> torch.Tensor:
        """sigma_t^2, t = 0..T, of a fixed variance (looked up each time so that ``.to(device)`` is followed)."""
        return self.schedule.variance(self.variance).sigma2

    def training_program(self, objective: str):
        """``(program, weight)`` that SVI optimizes for ``objective`` (one of :attr:`objectives`).

        ``elbo``: this model, no weights (the bound). ``simple``: lambda_t = 1 / (T w_t) of this model's
        fixed variance by ``poutine.scale``, with the Gaussian transition density as the t = 1 term, so the
        loss is Algorithm 1's eps-MSE of the eps the model implies (see :mod:`pyro_ddpm.elbo`).
        """
        if objective == "elbo":
            return self, None
        if objective == "simple":
            return self.with_likelihood(GaussianLikelihood()), simple_weights(self.schedule.variance(self.variance).w)
        raise ValueError(f"{type(self).__name__}: unknown objective {objective!r}; it supports {list(self.objectives)}")

    def with_likelihood(self, likelihood) -> ReverseProcess:
        """The same program (same class, network, schedule, variance) with another decoder; the network is shared."""
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.likelihood = likelihood
        return new

    def with_clipping(self) -> ReverseProcess:
        """The same program with its prediction of x_0 clipped to [-1, 1] in the mean (``clip_denoised``).

        Offered by every class that builds its transition from :meth:`predict_x0` (all shipped models);
        a class that overrides :meth:`transition` itself is refused with one clear error.
        """
        if type(self).transition is not ReverseProcess.transition:
            raise ValueError(
                f"{type(self).__name__} overrides transition(), so clipping its prediction of x_0 is not "
                "defined; implement predict_x0() and mean() instead to support clip_denoised"
            )
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.clip_denoised = True
        return new

    # ------------------------------------------------------------------ the transition
    def output_shape(self, input_shape: torch.Size) -> tuple[int, ...]:
        """The shape the network must return for an input of ``input_shape``: :meth:`output_channels` in dim 1."""
        return (input_shape[0], self.output_channels(self.data)) + tuple(input_shape[2:])

    def network_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output at (x_t, t), in x_t's dtype, with the input and output shapes checked."""
        if tuple(x_t.shape[1:]) != self.shape:
            raise ValueError(
                f"the network expects inputs of shape (batch, {', '.join(map(str, self.shape))}), "
                f"got {tuple(x_t.shape)}"
            )
        if t.shape != x_t.shape[:1]:
            raise ValueError(f"timesteps t must have shape ({x_t.shape[0]},), one per input, got {tuple(t.shape)}")
        self.schedule.check_timesteps(t)
        with torch.autocast(x_t.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = self.eps(x_t, t)
        if not torch.is_tensor(out):
            raise ValueError(f"the network returned a {type(out).__name__}, not a tensor")
        expected = self.output_shape(x_t.shape)
        if tuple(out.shape) != expected:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for input of shape {tuple(x_t.shape)}; "
                f"expected {expected}"
            )
        return out.to(x_t.dtype)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The prediction of x_0 from the network output ``out``: Eq. 4 solved at eps_theta (Eq. 15)."""
        return self.schedule.x0_from_eps(x_t, t, out)

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The noise the model implies, from the network output: eps_theta itself here; Eq. 4 solved at
        :meth:`predict_x0` for models that predict something else."""
        return out

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The implied eps at (x_t, t), from one network call (what Algorithm 1's loss compares with eps)."""
        return self.eps_hat(x_t, t, self.network_output(x_t, t))

    def mean(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t) from the network output: Eq. 11 (Eq. 7 at the clipped x0_hat when ``clip_denoised``)."""
        if self.clip_denoised:
            return self.mean_at_x0(x_t, t, out)
        return self.schedule.mean_from_eps(x_t, t, out)

    def mean_at_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """mu_tilde_t(x_t, x0_hat) (Eq. 7) at :meth:`predict_x0`, clipped to [-1, 1] when ``clip_denoised``."""
        return self.mean_at(x_t, t, self.predict_x0(x_t, t, out))

    def mean_at(self, x_t: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        """mu_tilde_t(x_t, x0_hat) (Eq. 7) at a given prediction of x_0, clipped to [-1, 1] when ``clip_denoised``."""
        if self.clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        return self.schedule.posterior_mean(x0_hat, x_t, t)

    def scale(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """sigma_t of the fixed variance, shaped like x_t."""
        return at(self.sigma2, t, x_t).sqrt().expand_as(x_t)

    def transition(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean mu_theta(x_t, t) and scale sigma_t of p_theta(x_{t-1} | x_t) (Eq. 1), from one network call."""
        return self.mean_and_scale(x_t, t, self.network_output(x_t, t))

    def mean_and_scale(
        self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`mean` and :meth:`scale` from one network output (a class whose two share work computes it once)."""
        return self.mean(x_t, t, out), self.scale(x_t, t, out)

    def prior(self, batch: int, like: torch.Tensor) -> dist.Distribution:
        """p(x_T) over whole data (the event-shaped :meth:`p_xT`)."""
        return self._event(self.p_xT(batch, like))

    # ------------------------------------------------------------------ the program's distributions
    def p_xT(self, batch: int, like: torch.Tensor) -> dist.Normal:
        """p(x_T) = N(0, I), in the dtype and on the device of ``like``."""
        return dist.Normal(like.new_zeros(()), 1.0).expand((batch,) + self.shape)

    def p_prev(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> dist.Normal:
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) (Eq. 1)."""
        return dist.Normal(*self.mean_and_scale(x_t, t, out))

    def p_x0(self, x_1: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        """p_theta(x_0 | x_1): the likelihood at mean mu_theta(x_1, 1), scale sigma_1 (Eq. 13)."""
        return self.likelihood(*self.mean_and_scale(x_1, t, out))

    def p_step(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        """:meth:`p_prev` and :meth:`p_x0` from one mean and scale: the decoder at the pairs ``where`` reads the
        transition's own (so their gradients meet at mu_theta before the network's backward pass)."""
        loc, scale = self.mean_and_scale(x_t, t, out)
        return dist.Normal(loc, scale), lambda w: self.likelihood(loc[w], scale[w])

    def x0_from_transition(self, fn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat = (mu_theta - coef_xt x_t) / coef_x0: the mean is the posterior mean at the prediction
        (Eq. 7 with Eq. 15), read off the traced transition in ``x_t``'s dtype."""
        return self.schedule.x0_from_mean(protocol.elementwise(fn).loc.to(x_t.dtype), x_t, t)

    def check_data(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """Always checked (not only under Pyro's validation): bad data gives one clear error, never a bound."""
        protocol.check_batch(x0, self.shape, t, self.T)
        self.likelihood.check(x0)
        param = next(self.eps.parameters(), None)
        if param is not None and param.dtype != x0.dtype and self.autocast is None:
            raise ValueError(
                f"x_0 is {x0.dtype} but the network's parameters are {param.dtype}: convert the images "
                f"(x0.to({param.dtype})) or the model"
            )
