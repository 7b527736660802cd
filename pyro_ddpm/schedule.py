"""The variance schedule and every constant derived from it, in one place.

All constants are computed in float64 from the array beta_1..beta_T
(Ho, Jain, Abbeel 2020, section 2) by one torch function, :func:`derive`. A fixed
:class:`Schedule` calls it once and stores the results as buffers of a
:class:`torch.nn.Module`, so ``schedule.to(device)`` (or ``.to(dtype)``) moves
them with the network; a learned schedule (``pyro_ddpm.guides.LearnedSchedule``)
calls it on betas computed from its parameters, differentiably. Every buffer has length ``T + 1`` and is indexed by the
paper's ``t``: ``schedule.beta[t]`` is beta_t. Index 0 holds the t = 0 value
where the paper defines one (abar_0 = 1, alpha_0 = 1) and 0 elsewhere.

Names follow the paper:

===================  ==========================================================
``beta``             beta_t
``alpha``            alpha_t = 1 - beta_t
``abar``             abar_t = prod_{s<=t} alpha_s                       (Eq. 4)
``abar_prev``        abar_{t-1}
``beta_tilde``       (1 - abar_{t-1}) / (1 - abar_t) beta_t, beta_tilde_1 = 0 (Eq. 7)
``coef_x0``          sqrt(abar_{t-1}) beta_t / (1 - abar_t)     mu_tilde's x_0 (Eq. 7)
``coef_xt``          sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)  mu_tilde's x_t (Eq. 7)
``eps_coef``         beta_t / sqrt(1 - abar_t)                         (Eq. 11)
``sigma2_large``     sigma_t^2 = beta_t, with sigma_1^2 = beta_tilde_2
``sigma2_small``     sigma_t^2 = beta_tilde_t, with sigma_1^2 = beta_tilde_2
``w_large/_small``   w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))  (Eq. 12)
``C_large/_small``   C_t = (r - 1 - log r) / 2, r = beta_tilde_t / sigma_t^2 (t >= 2)
===================  ==========================================================

The sigma_1^2 = beta_tilde_2 replacement is the official code's: beta_tilde_1 = 0
would give a degenerate decoder. C_1 is stored as 0: the t = 1 term is the
decoder's L_0, not a Gaussian KL.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

VARIANCES = ("large", "small")


class ModelVariance(NamedTuple):
    """The reverse process's fixed variance sigma_t^2 and its Eq. 12 weight and constant."""

    sigma2: torch.Tensor
    w: torch.Tensor
    C: torch.Tensor


# Every constant of the table above, in the order :func:`derive` returns them.
CONSTANTS = (
    "beta",
    "alpha",
    "abar",
    "abar_prev",
    "sqrt_abar",
    "sqrt_one_minus_abar",
    "beta_tilde",
    "coef_x0",
    "coef_xt",
    "eps_coef",
    "recip_sqrt_alpha",
    "sigma2_large",
    "w_large",
    "C_large",
    "sigma2_small",
    "w_small",
    "C_small",
)


def derive(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every constant of the table above from beta_1..beta_T: the one place of the schedule algebra.

    Plain torch operations, differentiable in ``betas`` (a learned schedule back-propagates through
    them); pass float64. Each result has length T + 1 and is indexed by t. The t = 0 slots are
    concatenated constants (never a ratio over 1 - abar_0 = 0), so no NaN gradient arises there.
    """
    zero, one = betas.new_zeros(1), betas.new_ones(1)

    def pad(v):  # t = 1..T values, with 0 in the t = 0 slot
        return torch.cat([zero, v])

    beta = pad(betas)
    alpha = 1.0 - beta
    abar = torch.cumprod(alpha, 0)
    abar_prev = torch.cat([one, abar[:-1]])
    b, a, ab, abp = betas, alpha[1:], abar[1:], abar_prev[1:]
    one_minus_abar = 1.0 - ab
    beta_tilde = (1.0 - abp) / one_minus_abar * b  # Eq. 7
    out = dict(
        beta=beta,
        alpha=alpha,
        abar=abar,
        abar_prev=abar_prev,
        sqrt_abar=abar.sqrt(),
        sqrt_one_minus_abar=pad(one_minus_abar.sqrt()),
        beta_tilde=pad(beta_tilde),
        coef_x0=pad(abp.sqrt() * b / one_minus_abar),
        coef_xt=pad(a.sqrt() * (1.0 - abp) / one_minus_abar),
        eps_coef=pad(b / one_minus_abar.sqrt()),
        recip_sqrt_alpha=1.0 / alpha.sqrt(),
    )
    for name, base in (("large", b), ("small", beta_tilde)):
        sigma2 = torch.cat([beta_tilde[1:2], base[1:]])  # sigma_1^2 = beta_tilde_2
        r = beta_tilde[1:] / sigma2[1:]
        out[f"sigma2_{name}"] = pad(sigma2)
        out[f"w_{name}"] = pad(b**2 / (2.0 * sigma2 * a * one_minus_abar))  # Eq. 12
        out[f"C_{name}"] = torch.cat([zero, zero, 0.5 * (r - 1.0 - torch.log(r))])
    return out


def check_betas(betas) -> np.ndarray:
    """beta_1..beta_T as a float64 numpy array; ValueError unless 1-D, T >= 2 and 0 < beta_t < 1."""
    beta = np.asarray(betas.detach().cpu() if torch.is_tensor(betas) else betas, dtype=np.float64)
    if beta.ndim != 1:
        raise ValueError(f"schedule: betas must be a 1-D array, got shape {beta.shape}")
    if beta.size < 2:
        raise ValueError(f"schedule: need T >= 2 timesteps, got T = {beta.size}")
    if not np.all(np.isfinite(beta)) or np.any(beta <= 0) or np.any(beta >= 1):
        bad = beta[~(np.isfinite(beta) & (beta > 0) & (beta < 1))]
        raise ValueError(f"schedule: every beta_t must satisfy 0 < beta_t < 1, got {bad[:5].tolist()}")
    return beta


class ScheduleBase:
    """What every schedule offers besides its constants: ``T``, ``betas``, ``variance``, the checks.

    A subclass provides the attributes named in :data:`CONSTANTS` (buffers or computed properties)
    and :meth:`constants`.
    """

    T: int

    def constants(self) -> dict[str, torch.Tensor]:
        """All constants of :data:`CONSTANTS` by name."""
        return {name: getattr(self, name) for name in CONSTANTS}

    @property
    def betas(self) -> torch.Tensor:
        """beta_1..beta_T (length T, float64): what a checkpoint stores."""
        return self.beta[1:]

    def variance(self, kind: str) -> ModelVariance:
        """The model variance ``"large"`` (sigma_t^2 = beta_t) or ``"small"`` (beta_tilde_t)."""
        if kind not in VARIANCES:
            raise ValueError(f"schedule: unknown variance {kind!r}; choose one of {VARIANCES}")
        c = self.constants()
        return ModelVariance(c[f"sigma2_{kind}"], c[f"w_{kind}"], c[f"C_{kind}"])

    def check_timesteps(self, t: torch.Tensor) -> None:
        """Raise ValueError unless every entry of ``t`` is an integer in 1..T."""
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"timesteps t must be an integer tensor, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 1 or int(t.max()) > self.T):
            raise ValueError(
                f"timesteps t must lie in 1..T = 1..{self.T}, got values in {int(t.min())}..{int(t.max())}"
            )

    def check_matches(self, betas, what: str = "checkpoint") -> None:
        """Raise ValueError unless ``betas`` is this schedule's beta_1..beta_T."""
        other = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if other.numel() != self.T:
            raise ValueError(f"schedule mismatch: the {what} has T = {other.numel()}, this schedule has T = {self.T}")
        if not torch.allclose(other, self.betas.detach().to(other), rtol=1e-12, atol=0.0):
            raise ValueError(f"schedule mismatch: the {what}'s betas differ from this schedule's (same T = {self.T})")

    # ----------------------------------------------------------------- the operations of the paper
    # Every program (models, guides, samplers, the evaluator) goes through these: each formula is written
    # once, next to the constants it uses. ``t`` is an integer tensor of timesteps (batch dims first);
    # results are in the dtype of the tensor argument (see :func:`at`).

    def q_mean(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_t) x_0: the mean of q(x_t | x_0) (Eq. 4)."""
        return at(self.sqrt_abar, t, x0) * x0

    def q_scale(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sqrt(1 - abar_t), shaped like ``like``: the scale of q(x_t | x_0) (Eq. 4)."""
        return at(self.sqrt_one_minus_abar, t, like).expand_as(like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4, reparameterized)."""
        return self.q_mean(x0, t) + at(self.sqrt_one_minus_abar, t, x0) * eps

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """mu_tilde_t(x_t, x_0) = coef_x0_t x_0 + coef_xt_t x_t (Eq. 7)."""
        return at(self.coef_x0, t, x_t) * x0 + at(self.coef_xt, t, x_t) * x_t

    def x0_from_mean(self, mean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x_0 at which Eq. 7's mean equals ``mean``: (mean - coef_xt_t x_t) / coef_x0_t."""
        return (mean - at(self.coef_xt, t, x_t) * x_t) / at(self.coef_x0, t, x_t)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): Eq. 4 solved for x_0 (Eq. 15)."""
        return (x_t - at(self.sqrt_one_minus_abar, t, x_t) * eps) / at(self.sqrt_abar, t, x_t)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t): Eq. 4 solved for the noise."""
        return (x_t - at(self.sqrt_abar, t, x_t) * x0) / at(self.sqrt_one_minus_abar, t, x_t)

    def mean_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (Eq. 11).

        Algebraically Eq. 7 at :meth:`x0_from_eps`; computed directly, without dividing by
        sqrt(abar_t) (which loses float32 precision near t = T).
        """
        return at(self.recip_sqrt_alpha, t, x_t) * (x_t - at(self.eps_coef, t, x_t) * eps)

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, for v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        return at(self.sqrt_abar, t, x_t) * x_t - at(self.sqrt_one_minus_abar, t, x_t) * v

    def v_from(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans and Ho 2022)."""
        return at(self.sqrt_abar, t, x0) * eps - at(self.sqrt_one_minus_abar, t, x0) * x0

    def extra_repr(self) -> str:
        beta = self.betas.detach()
        return f"T={self.T}, beta_1={beta[0].item():.3g}, beta_T={beta[-1].item():.3g}"


class Schedule(ScheduleBase, nn.Module):
    """Forward-process variances beta_1..beta_T and the constants derived from them (fixed buffers).

    :param betas: the T values beta_1..beta_T, each strictly between 0 and 1, T >= 2.
    """

    def __init__(self, betas):
        super().__init__()
        beta = check_betas(betas)
        self.T = int(beta.size)
        for name, value in derive(torch.as_tensor(beta, dtype=torch.float64)).items():
            self.register_buffer(name, value)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def linear(cls, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> Schedule:
        """The paper's schedule: beta increasing linearly from 1e-4 to 0.02 over T = 1000 steps."""
        return cls(np.linspace(beta_1, beta_T, int(T), dtype=np.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """Nichol and Dhariwal (2021, Eq. 17): abar_t = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

        beta_t = 1 - abar_t / abar_{t-1}, clipped at ``max_beta``.
        """
        steps = np.arange(int(T) + 1, dtype=np.float64) / int(T)
        f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
        abar = f / f[0]
        return cls(np.minimum(1.0 - abar[1:] / abar[:-1], max_beta))

    @classmethod
    def from_name(cls, name: str, T: int) -> Schedule:
        """``linear`` or ``cosine`` with T steps (the CLI's and checkpoints' spelling)."""
        constructors = {"linear": cls.linear, "cosine": cls.cosine}
        if name not in constructors:
            raise ValueError(f"schedule: unknown schedule {name!r}; choose one of {sorted(constructors)}")
        return constructors[name](T)


def at(constant: torch.Tensor, t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``constant[t]`` shaped to broadcast against ``x`` (batch dims of ``t`` first), in ``dtype`` (default
    ``x``'s: give it when ``x`` holds integer states)."""
    c = constant[t].to(dtype=dtype or x.dtype)
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))
