"""The forward process q(x_{1:T} | x_0) of Ho, Jain, Abbeel (2020) as a Pyro guide.

    q(x_t | x_0)            = N(sqrt(abar_t) x_0, (1 - abar_t) I)                     (Eq. 4)
    q(x_{t-1} | x_t, x_0)   = N(mu_tilde_t(x_t, x_0), beta_tilde_t I)                 (Eqs. 6, 7)
    mu_tilde_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t) x_t

It is written in the reverse factorization q(x_T | x_0) prod_{t>=2} q(x_{t-1} | x_t, x_0) of the
same joint as Eq. 2, so it samples x_T first, in the model's order: each latent's parents in the
model (x_t) are its parents in the guide, which is the condition under which ``TraceMeanField_ELBO``'s
per-site analytic KLs are exactly the terms L_T and L_{t-1} of Eq. 5. It has no parameters.
Site names and shapes follow :mod:`pyro_ddpm.protocol`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import Schedule, at


@GUIDES.register
class ForwardProcess(nn.Module):
    """The fixed noising process, as the variational family of the reverse process.

    :param schedule: the variance schedule (a :class:`~pyro_ddpm.schedule.Schedule`, or a learned one).
    :param event_dim: the number of data dimensions (default: every dimension after the batch).
    """

    def __init__(self, schedule: Schedule, event_dim: int | None = None):
        super().__init__()
        self.schedule = schedule
        self.event_dim = event_dim

    def config(self) -> dict:
        """Plain data that rebuilds this guide with :meth:`from_config`: the betas themselves."""
        return {"betas": [float(b) for b in self.schedule.betas.detach().cpu().tolist()], "event_dim": self.event_dim}

    @classmethod
    def from_config(cls, *, betas, event_dim: int | None = None) -> ForwardProcess:
        """The guide of :meth:`config` (a checkpoint's ``state_dict()`` is then loaded into it)."""
        return cls(Schedule(betas), event_dim=event_dim)

    @classmethod
    def from_spec(cls, T: int, spec: str, event_dim: int | None = None) -> ForwardProcess:
        """The guide a training config asks for: the named fixed schedule (``linear``, ``cosine``) with T steps."""
        return cls(Schedule.from_name(spec, T), event_dim=event_dim)

    @property
    def T(self) -> int:
        return self.schedule.T

    def _event(self, d, x0):
        return d.to_event(self.event_dim if self.event_dim is not None else x0.dim() - 1)

    def q_t(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and scale of q(x_t | x_0) (Eq. 4)."""
        return self.schedule.q_mean(x0, t), self.schedule.q_scale(t, x0)

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean mu_tilde_t and scale sqrt(beta_tilde_t) of q(x_{t-1} | x_t, x_0) (Eqs. 6, 7).

        beta_tilde_1 = 0 (the posterior of x_0 is a point mass); where t = 1 the scale returned is 1,
        a finite stand-in for slots that the per-timestep form masks out.
        """
        loc = self.schedule.posterior_mean(x0, x_t, t)
        var = at(self.schedule.beta_tilde, t, x0)
        return loc, torch.where(var > 0, var, torch.ones_like(var)).sqrt().expand_as(loc)

    def _check(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> None:
        # The guide runs first under every ELBO: bad input must be named here, not deep inside Normal.
        if torch.is_tensor(x0) and self.event_dim is not None and x0.dim() != self.event_dim + 1:
            raise ValueError(
                f"x_0 has shape {tuple(x0.shape)}: expected a batch of data with {self.event_dim} dimension(s)"
            )
        protocol.check_batch(x0, x0.shape[1:] if torch.is_tensor(x0) else (), t, self.T)

    def _register(self) -> None:
        """A schedule with parameters (a learned one) is registered with Pyro: SVI then trains it, and
        the model, built around the same schedule object, follows."""
        if next(self.schedule.parameters(), None) is not None:
            pyro.module("schedule", self.schedule)

    def chain(self, x0: torch.Tensor, num_images: int | None = None) -> None:
        """q(x_T | x_0) prod_{t=T..2} q(x_{t-1} | x_t, x_0)."""
        self._register()
        self._check(x0)
        B = x0.shape[0]
        with pyro.plate(protocol.IMAGES, B):
            t = torch.full((B,), self.T, dtype=torch.long, device=x0.device)
            x = pyro.sample(protocol.chain_site(self.T), self._event(dist.Normal(*self.q_t(x0, t)), x0))
            for step in range(self.T, 1, -1):
                loc, scale = self.posterior(x, x0, torch.full_like(t, step))
                x = pyro.sample(protocol.chain_site(step - 1), self._event(dist.Normal(loc, scale), x0))

    def per_timestep(self, x0: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """q(x_T | x_0), then for each (image, t) pair x_t ~ q(x_t | x_0) and x_{t-1} ~ q(x_{t-1} | x_t, x_0)."""
        self._register()
        self._check(x0, t)
        B = x0.shape[0]
        with pyro.plate(protocol.IMAGES, B):
            T = torch.full((B,), self.T, dtype=torch.long, device=x0.device)
            pyro.sample(protocol.X_T, self._event(dist.Normal(*self.q_t(x0, T)), x0))
        x0, t = protocol.pairs(x0, t)
        with protocol.timestep_plate(t.view(B, -1), self.T), protocol.weighted(weight, t, x0):
            with poutine.mask(mask=False):
                x_t = pyro.sample(protocol.X_t, self._event(dist.Normal(*self.q_t(x0, t)), x0))
            loc, scale = self.posterior(x_t, x0, t)
            with poutine.mask(mask=t > 1):
                pyro.sample(protocol.X_PREV, self._event(dist.Normal(loc, scale), x0))
