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
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, ScoredWhere
from pyro_ddpm.schedule import Schedule, at


class ReverseProcess(nn.Module):
    """The generative model: a Markov chain from N(0, I) down to the data through eps_theta.

    :param eps: any ``nn.Module`` ``eps(x_t, t)`` with integer ``t`` in 1..T returning a tensor
        shaped like ``x_t``.
    :param schedule: the :class:`~pyro_ddpm.schedule.Schedule` (shared with the guide).
    :param variance: ``"large"`` (sigma_t^2 = beta_t) or ``"small"`` (sigma_t^2 = beta_tilde_t).
    :param likelihood: the decoder p_theta(x_0 | x_1); default the discretized Gaussian with 256 levels.
    :param shape: the shape of one datum; default ``eps.shape``.
    """

    def __init__(self, eps: nn.Module, schedule: Schedule, variance: str = "large", likelihood=None, shape=None):
        super().__init__()
        self.eps = eps
        self.schedule = schedule
        self.check_variance(schedule, variance)
        self.variance = variance
        self.likelihood = likelihood if likelihood is not None else DiscretizedGaussianLikelihood(256)
        shape = shape if shape is not None else getattr(eps, "shape", None)
        if shape is None:
            raise ValueError("ReverseProcess: give the data shape (the network has no .shape attribute)")
        self.shape = tuple(int(s) for s in shape)
        self.autocast = None  # e.g. torch.bfloat16: the network (only) runs under torch.autocast

    @classmethod
    def network_config(cls, preset: dict) -> dict:
        """The network preset (see :data:`pyro_ddpm.nets.PRESETS`) this class needs for data the preset fits.

        Unchanged here: eps_theta is shaped like its input. Subclasses whose network outputs more
        (e.g. a variance too) return the preset with the larger output.
        """
        return dict(preset)

    @classmethod
    def check_variance(cls, schedule: Schedule, variance: str) -> None:
        """Raise ValueError unless ``variance`` names a variance this class supports (``large``, ``small``)."""
        schedule.variance(variance)

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def sigma2(self) -> torch.Tensor:
        """sigma_t^2, t = 0..T (looked up each time so that ``.to(device)`` is followed)."""
        return self.schedule.variance(self.variance).sigma2

    def with_likelihood(self, likelihood) -> "ReverseProcess":
        """The same program (same class, network, schedule, variance) with another decoder; the network is shared."""
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.likelihood = likelihood
        return new

    def with_network(self, eps: nn.Module) -> "ReverseProcess":
        """The same program around another network module (e.g. the same network wrapped for DDP)."""
        new = copy.copy(self)
        new._modules = dict(self._modules, eps=eps)
        return new

    # ------------------------------------------------------------------ the transition
    def output_shape(self, input_shape: torch.Size) -> tuple[int, ...]:
        """The shape the network must return for an input of ``input_shape``: the same here."""
        return tuple(input_shape)

    def network_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output at (x_t, t), with the input and output shapes checked."""
        if tuple(x_t.shape[1:]) != self.shape:
            raise ValueError(f"the network expects inputs of shape (batch, {', '.join(map(str, self.shape))}), got {tuple(x_t.shape)}")
        if is_validation_enabled():
            self.schedule.check_timesteps(t)
        with torch.autocast(x_t.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = self.eps(x_t, t)
        expected = self.output_shape(x_t.shape)
        if tuple(out.shape) != expected:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input of shape {tuple(x_t.shape)}; expected {expected}")
        return out

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t), with the input and output shapes checked against the data shape."""
        return self.network_output(x_t, t)

    def mean_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)  (Eq. 11)."""
        s = self.schedule
        return at(s.recip_sqrt_alpha, t, x_t) * (x_t - at(s.eps_coef, t, x_t) * eps.to(x_t.dtype))

    def transition(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean mu_theta(x_t, t) (Eq. 11) and scale sigma_t of p_theta(x_{t-1} | x_t) (Eq. 1)."""
        loc = self.mean_from_eps(x_t, t, self.predict_eps(x_t, t))
        scale = at(self.sigma2, t, x_t).sqrt().expand_as(loc)
        return loc, scale

    def _event(self, d):
        return d.to_event(len(self.shape))

    def prior(self, batch: int, like: torch.Tensor) -> dist.Distribution:
        """p(x_T) = N(0, I), in the dtype and on the device of ``like``."""
        return self._event(dist.Normal(like.new_zeros(()), 1.0).expand((batch,) + self.shape))

    def _check_data(self, x0: torch.Tensor) -> None:
        if tuple(x0.shape[1:]) != self.shape:
            raise ValueError(f"x_0 has shape {tuple(x0.shape)}, but the model's data shape is (batch, {', '.join(map(str, self.shape))})")
        if is_validation_enabled():
            self.likelihood.check(x0)

    # ------------------------------------------------------------------ the chain form
    def chain_start(self, x0: torch.Tensor | None, num_images: int | None) -> tuple[int, torch.Tensor]:
        """(number of images, a tensor whose dtype and device x_T takes) for a chain over ``x0`` or ``num_images``."""
        if x0 is not None:
            self._check_data(x0)
            return x0.shape[0], x0
        if num_images is None:
            raise ValueError("chain: give x0 or num_images")
        param = next(self.eps.parameters(), None)
        return num_images, torch.zeros((), dtype=param.dtype if param is not None else torch.get_default_dtype(),
                                       device=self.schedule.beta.device)

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
    def per_timestep(self, x0: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """The bound's terms at K timesteps per image, all scored with one network call.

        ``t`` is (B, K); see :mod:`pyro_ddpm.protocol`. The prior of the conditioning site ``x_t`` is
        a placeholder: the site is masked out in both programs and only carries the guide's draw.
        """
        pyro.module("eps", self.eps)
        self._check_data(x0)
        B = x0.shape[0]
        with pyro.plate(protocol.IMAGES, B):
            pyro.sample(protocol.X_T, self.prior(B, x0))
        x0, t = protocol.pairs(x0, t)
        with protocol.timestep_plate(t.view(B, -1), self.T), protocol.weighted(weight, t, x0):
            with poutine.mask(mask=False):
                x_t = pyro.sample(protocol.X_t, self.prior(x0.shape[0], x0))
            loc, scale = self.transition(x_t, t)
            with poutine.mask(mask=t > 1):
                pyro.sample(protocol.X_PREV, self._event(dist.Normal(loc, scale)))
            decoder = ScoredWhere(self.likelihood, loc, scale, where=t == 1)  # computed at t = 1 pairs only
            with poutine.mask(mask=t == 1):
                pyro.sample(protocol.X_0, self._event(decoder), obs=x0)
