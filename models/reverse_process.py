"""The reverse process p_theta(x_{0:T}) of Ho, Jain, Abbeel (2020) as a Pyro model.

    p(x_T) = N(0, I),   p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)            (Eq. 1)
    mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(alpha_t)   (Eq. 11)
    p_theta(x_0 | x_1) = the likelihood at mean mu_theta(x_1, 1), scale sigma_1              (Eq. 13)

:meth:`ReverseProcess.transition` is the one definition of p_theta(x_{t-1} | x_t); the chain form,
the per-timestep training form and the sampler all call it. Site names and shapes follow
:mod:`pyro_ddpm.protocol`.
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.elbo import simple_weights
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, GaussianLikelihood, ScoredWhere
from pyro_ddpm.protocol import DataSpec
from pyro_ddpm.registry import MODELS
from pyro_ddpm.schedule import Schedule, at


@MODELS.register
class ReverseProcess(nn.Module):
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

    What the class declares, read by the trainer and the command line (nothing outside names a variant):

    - :attr:`variances`: the variance rules it implements, the first being the default;
    - :attr:`objectives`: what it can be trained on (:meth:`training_program` builds each);
    - :meth:`output_channels`: the network output it needs for given data.
    """

    variances: tuple[str, ...] = ("large", "small")
    objectives: tuple[str, ...] = ("elbo", "simple")

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

    # ------------------------------------------------------------------ self-description
    def config(self) -> dict:
        """Plain data that, with the network, schedule and likelihood, rebuilds this model (:meth:`from_config`)."""
        return {"variance": self.variance, "shape": list(self.shape)}

    @classmethod
    def from_config(cls, *, eps: nn.Module, schedule, likelihood, **config) -> ReverseProcess:
        """The model of :meth:`config` around the given network, schedule and likelihood."""
        return cls(eps, schedule, likelihood=likelihood, **config)

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

    def with_network(self, eps: nn.Module) -> ReverseProcess:
        """The same program around another network module (e.g. the same network wrapped for DDP)."""
        new = copy.copy(self)
        new._modules = dict(self._modules, eps=eps)
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

    def _event(self, d):
        return d.to_event(len(self.shape))

    def prior(self, batch: int, like: torch.Tensor) -> dist.Distribution:
        """p(x_T) = N(0, I), in the dtype and on the device of ``like``."""
        return self._event(dist.Normal(like.new_zeros(()), 1.0).expand((batch,) + self.shape))

    def _check_data(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> None:
        # Always checked (not only under Pyro's validation): bad data gives one clear error, never a bound.
        protocol.check_batch(x0, self.shape, t, self.T)
        self.likelihood.check(x0)
        param = next(self.eps.parameters(), None)
        if param is not None and param.dtype != x0.dtype and self.autocast is None:
            raise ValueError(
                f"x_0 is {x0.dtype} but the network's parameters are {param.dtype}: convert the images "
                f"(x0.to({param.dtype})) or the model"
            )

    # ------------------------------------------------------------------ the chain form
    def chain_start(self, x0: torch.Tensor | None, num_images: int | None) -> tuple[int, torch.Tensor]:
        """(number of images, a tensor whose dtype and device x_T takes) for a chain over ``x0`` or ``num_images``."""
        if x0 is not None:
            self._check_data(x0)
            return x0.shape[0], x0
        if num_images is None:
            raise ValueError("chain: give x0 or num_images")
        param = next(self.eps.parameters(), None)
        return num_images, torch.zeros(
            (), dtype=param.dtype if param is not None else torch.get_default_dtype(), device=self.schedule.beta.device
        )

    def chain(self, x0: torch.Tensor | None = None, num_images: int | None = None) -> torch.Tensor:
        """p(x_T) prod_t p_theta(x_{t-1} | x_t): every term of Eq. 5 at its own site.

        With ``x0=None`` this is Algorithm 2 (ancestral sampling) of ``num_images`` images; the
        returned x_0 is an exact draw of the decoder (on the data grid for a discretized likelihood).
        """
        pyro.module("eps", self.eps)
        num_images, like = self.chain_start(x0, num_images)
        with pyro.plate(protocol.IMAGES, num_images):
            x = pyro.sample(protocol.chain_site(self.T), self.prior(num_images, like))
            t = torch.empty(num_images, dtype=torch.long, device=x.device)
            for step in range(self.T, 1, -1):
                loc, scale = self.transition(x, torch.full_like(t, step))
                x = pyro.sample(protocol.chain_site(step - 1), self._event(dist.Normal(loc, scale)))
            loc, scale = self.transition(x, torch.full_like(t, 1))
            return pyro.sample(protocol.X_0, self._event(self.likelihood(loc, scale)), obs=x0)

    # ------------------------------------------------------------------ the training form
    def begin_per_timestep(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """What every training form starts with: the network registered, the input checked, the site
        ``x_T`` (L_T, per image); returns B and the pairs (x_0 repeated per timestep, flat t)."""
        pyro.module("eps", self.eps)
        self._check_data(x0, t)
        B = x0.shape[0]
        with pyro.plate(protocol.IMAGES, B):
            pyro.sample(protocol.X_T, self.prior(B, x0))
        return (B, *protocol.pairs(x0, t))

    def per_timestep(self, x0: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """The bound's terms at K timesteps per image, all scored with one network call.

        ``t`` is (B, K); see :mod:`pyro_ddpm.protocol`. The prior of the conditioning site ``x_t`` is
        a placeholder: the site is masked out in both programs and only carries the guide's draw.
        """
        B, x0, t = self.begin_per_timestep(x0, t)
        with protocol.timestep_plate(t.view(B, -1), self.T), protocol.weighted(weight, t, x0):
            with poutine.mask(mask=False):
                x_t = pyro.sample(protocol.X_t, self.prior(x0.shape[0], x0))
            loc, scale = self.transition(x_t, t)
            with poutine.mask(mask=t > 1):
                pyro.sample(protocol.X_PREV, self._event(dist.Normal(loc, scale)))
            decoder = ScoredWhere(self.likelihood, loc, scale, where=t == 1)  # computed at t = 1 pairs only
            with poutine.mask(mask=t == 1):
                pyro.sample(protocol.X_0, self._event(decoder), obs=x0)
