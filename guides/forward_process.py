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

import pyro.distributions as dist
import torch

from pyro_ddpm.programs import ForwardProgram
from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import Schedule, at


@GUIDES.register
class ForwardProcess(ForwardProgram):
    """The fixed noising process, as the variational family of the reverse process.

    :param schedule: the variance schedule (a :class:`~pyro_ddpm.schedule.Schedule`, or a learned one).
    :param event_dim: the number of data dimensions (default: every dimension after the batch).

    The schedule is an object, so this constructor's config stores its betas instead (:meth:`config`).
    The subclasses over a schedule they build themselves (:class:`~pyro_ddpm.guides.LinearForwardProcess`,
    ...) are described by their own constructor's arguments.
    """

    family = "gaussian"
    NAME: str | None = None  # a guide over one named schedule: the only ``spec`` its from_spec takes

    def __init__(self, schedule: Schedule, event_dim: int | None = None):
        super().__init__()
        self.schedule = schedule
        self.event_dim = event_dim

    def config(self) -> dict:
        """The constructor's arguments with the schedule stored as its betas (rebuilt by :meth:`from_config`)."""
        return {"betas": [float(b) for b in self.schedule.betas.detach().cpu().tolist()], "event_dim": self.event_dim}

    @classmethod
    def from_config(cls, *, betas, event_dim: int | None = None) -> ForwardProcess:
        """The guide of :meth:`config` (a checkpoint's ``state_dict()`` is then loaded into it)."""
        return cls(Schedule(betas), event_dim=event_dim)

    @classmethod
    def from_spec(cls, T: int, spec: str, event_dim: int | None = None) -> ForwardProcess:
        """The guide a training config asks for: the named fixed schedule (``linear``, ``cosine``) with T steps.

        A class over one named schedule (:attr:`NAME`) takes that name only, and is built with its own
        defaults for everything but T: ``from_config(T=T, event_dim=event_dim)``.
        """
        if cls.NAME is None:
            return cls(Schedule.from_name(spec, T), event_dim=event_dim)
        if spec != cls.NAME:
            raise ValueError(f"{cls.__name__}: schedule must be {cls.NAME!r}, got {spec!r}")
        return cls.from_config(T=T, event_dim=event_dim)

    @property
    def T(self) -> int:
        return self.schedule.T

    def q_xt(self, x0: torch.Tensor, t: torch.Tensor) -> dist.Normal:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Eq. 4)."""
        return dist.Normal(*self.q_t(x0, t))

    def q_prev(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> dist.Normal:
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I) (Eqs. 6, 7)."""
        return dist.Normal(*self.posterior(x_t, x0, t))

    def from_noise(self, fn: dist.Normal, noise: torch.Tensor) -> torch.Tensor:
        """x_t = loc + scale * eps: the reparameterized draw (its gradient reaches a learned schedule)."""
        return fn.loc + fn.scale * noise.to(fn.loc)

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
