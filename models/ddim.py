"""DDIM sampling (Song, Meng, Ermon 2021) from any reverse-process model, as a Pyro model.

The chain visits the respaced timesteps tau_S = T > ... > tau_1 (:mod:`pyro_ddpm.respace`; primes mark
the respaced schedule, abar'_i = abar_{tau_i}, abar'_0 = 1). At step i it reads the model's
prediction off its transition mean mu = mu_theta(x_{tau_i}, i) of the respaced chain, the mean of
p(x_{tau_{i-1}} | x_{tau_i}) (Ho et al. 2020, Eq. 11). Every model of this package centres that mean on
the posterior mean at its prediction of x_0 (Eq. 7 with Eq. 15; also for x_0-, v-predicting or clipped
models), so Eq. 7 inverted and Eq. 4 solved for the noise give

    x0_hat  = (mu - coef'_xt x_t) / coef'_x0                                              (Eq. 7)
    eps_hat = (x_t - sqrt(abar'_i) x0_hat) / sqrt(1 - abar'_i)                            (Eq. 4)

without asking how the network is parameterized. DDIM's generalized step (Song et al., Eq. 12) is

    x_{tau_{i-1}} = sqrt(abar'_{i-1}) x0_hat + sqrt(1 - abar'_{i-1} - sigma_i^2) eps_hat + sigma_i z,
    sigma_i^2 = eta^2 (1 - abar'_{i-1}) / (1 - abar'_i) (1 - abar'_i / abar'_{i-1})
              = eta^2 beta_tilde'_i                                                 (Song et al., Eq. 16)

(beta_tilde' of Ho et al. Eq. 7 for the respaced schedule). With eta = 1 the step is respaced ancestral
sampling with sigma^2 = beta_tilde': its mean equals coef'_x0 x0_hat + coef'_xt x_t = mu, because
coef'_xt sqrt(1 - abar'_i) = sqrt(1 - abar'_{i-1} - beta_tilde'_i). With eta = 0 it is deterministic.

Sites, under ``pyro.plate("images", B)``: ``x_T`` (p(x_T) = N(0, I)), ``x_{tau_{S-1}}``, ..., ``x_{tau_1}``
and ``x_0``. A deterministic step (eta = 0) is a ``Delta`` site: a Normal needs a positive scale (Pyro's
validation rejects 0) and a tiny one would not be deterministic, while a Delta keeps ``poutine.trace``,
``poutine.condition`` and ``Predictive`` working and records the value it returns.

The last step. With abar'_0 = 1, Eq. 12 gives x_0 = x0_hat for every eta (sigma_1 = 0). As in the
ancestral chain, x_0 is drawn from the model's likelihood p_theta(x_0 | x_{tau_1}) of the respaced chain,
whose mean at i = 1 is exactly x0_hat (coef'_x0 = 1, coef'_xt = 0) and whose scale is the model's
sigma'_1: for the discretized decoder that puts x_0 on the data grid; it is the only randomness left
when eta = 0.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.respace import respace
from pyro_ddpm.schedule import at


class DDIM(nn.Module):
    """The DDIM sampler around a trained reverse-process ``model`` (shared network, not copied).

    :param model: any model following :mod:`pyro_ddpm.protocol` with a ``transition(x_t, t)`` whose mean
        is the posterior mean at its x_0 prediction (``ReverseProcess`` and its subclasses).
    :param steps: S, the number of network calls (2 <= S <= T; default T); timesteps as in
        :func:`pyro_ddpm.respace.respaced_timesteps`.
    :param eta: 0 (deterministic DDIM) to 1 (respaced ancestral sampling with sigma^2 = beta_tilde').
    """

    def __init__(self, model, steps: int | None = None, eta: float = 0.0):
        super().__init__()
        if (
            isinstance(eta, bool)
            or not isinstance(eta, (int, float))
            or not math.isfinite(eta)
            or not 0.0 <= eta <= 1.0
        ):
            raise ValueError(f"DDIM: eta must be a number in [0, 1], got {eta!r}")
        self.model = respace(model, model.T if steps is None else steps)
        self.eta = float(eta)
        self.T = model.T
        self.timesteps = self.model.timesteps
        self.shape = tuple(model.shape)
        s = self.model.schedule
        var = self.eta**2 * s.beta_tilde  # sigma_i^2 (Song et al., Eq. 16), i = 0..S
        self.register_buffer("sigma", var.sqrt())
        self.register_buffer("dir_coef", (1.0 - s.abar_prev - var).clamp_min(0.0).sqrt())  # Eq. 12's eps_hat
        self.train(model.training)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def likelihood(self):
        return self.model.likelihood

    def predict(self, x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) at x = x_{tau_i}, read off the model's transition mean (Eqs. 7 and 4)."""
        s = self.model.schedule
        mu, _ = self.model.transition(x, i)
        x0_hat = s.x0_from_mean(mu, x, i)
        return x0_hat, s.eps_from_x0(x, i, x0_hat)

    def step(self, x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and scale sigma_i of x_{tau_{i-1}} given x = x_{tau_i} (Song et al., Eq. 12), i in 2..S."""
        s = self.model.schedule
        x0_hat, eps_hat = self.predict(x, i)
        loc = at(s.abar_prev, i, x).sqrt() * x0_hat + at(self.dir_coef, i, x) * eps_hat
        return loc, at(self.sigma, i, x).expand_as(loc)

    def _event(self, d):
        return d.to_event(len(self.shape))

    def chain(self, x0: torch.Tensor | None = None, num_images: int | None = None) -> torch.Tensor:
        """x_T ~ N(0, I), the DDIM steps down to x_{tau_1}, then x_0 from the decoder (see the module docstring)."""
        model = self.model
        protocol.register("eps", model.eps)
        num_images, like = model.chain_start(x0, num_images)
        with pyro.plate(protocol.IMAGES, num_images):
            x = pyro.sample(protocol.chain_site(self.T), model.prior(num_images, like))
            i = torch.empty(num_images, dtype=torch.long, device=x.device)
            for step in range(self.steps, 1, -1):
                loc, scale = self.step(x, torch.full_like(i, step))
                site = (
                    dist.Delta(loc, event_dim=len(self.shape))
                    if self.eta == 0
                    else self._event(dist.Normal(loc, scale))
                )
                x = pyro.sample(protocol.chain_site(self.timesteps[step - 2]), site)
            loc, scale = model.transition(x, torch.full_like(i, 1))
            return pyro.sample(protocol.X_0, self._event(model.likelihood(loc, scale)), obs=x0)
