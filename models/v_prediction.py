"""The reverse process with a network that predicts v (Salimans and Ho 2022) instead of eps.

    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0,     x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Eq. 4)

Derivation of x_0 and eps from (x_t, v). Write a = sqrt(abar_t), b = sqrt(1 - abar_t), a^2 + b^2 = 1.
The pair (x_t, v) is a rotation of (x_0, eps): [x_t; v] = [[a, b], [-b, a]] [x_0; eps], whose
inverse is the transpose, so

    x0_theta  = a x_t - b v_theta = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_theta,
    eps_theta = b x_t + a v_theta = sqrt(1 - abar_t) x_t + sqrt(abar_t) v_theta.

(Check: a x_t - b v = a (a x_0 + b eps) - b (a eps - b x_0) = (a^2 + b^2) x_0 = x_0, and likewise
b x_t + a v = (b^2 + a^2) eps = eps.) The mean is the forward posterior's at the predicted x_0,

    mu_theta(x_t, t) = mu_tilde_t(x_t, x0_theta)                                               (Eq. 7)

which is also Eq. 11's mean at eps_theta above (the two parameterizations of mu_tilde_t agree, see
:mod:`models.x0_prediction`). The bound is unchanged in meaning: the same Gaussians
N(mu_theta, sigma_t^2), so L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)); since
x_0 - x0_theta = b (v_theta - v), L_{t-1} = coef_x0_t^2 (1 - abar_t) / (2 sigma_t^2) ||v - v_theta||^2 + D C_t.

Variances, prior, decoder, both forms, clipping and sampling are inherited from
:class:`~pyro_ddpm.models.ReverseProcess`; the network is stored as ``.eps`` (its Pyro name).
"""

from __future__ import annotations

import torch

from pyro_ddpm.registry import MODELS

from .reverse_process import ReverseProcess


@MODELS.register
class VPredictionReverseProcess(ReverseProcess):
    """p_theta(x_{t-1} | x_t) centred on the forward posterior mean at the x_0 implied by v_theta."""

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0_theta = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_theta(x_t, t)."""
        return self.schedule.x0_from_v(x_t, t, out)

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The eps implied by x0_theta (Eq. 4 solved for the noise)."""
        return self.schedule.eps_from_x0(x_t, t, self.predict_x0(x_t, t, out))

    def mean(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """mu_tilde_t(x_t, x0_theta) (Eq. 7)."""
        return self.mean_at_x0(x_t, t, out)
