"""The reverse process with a network that predicts x_0 instead of eps.

    x0_theta(x_t, t) ~ x_0,   mu_theta(x_t, t) = mu_tilde_t(x_t, x0_theta(x_t, t))
                             = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_theta
                               + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t           (Eq. 7)

The bound is unchanged in meaning. Writing x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4),
the eps a network implies is eps(x0_theta) = (x_t - sqrt(abar_t) x0_theta) / sqrt(1 - abar_t), and
mu_tilde_t(x_t, x0_theta) equals Eq. 11's mean at that eps: substituting x_0 = (x_t - sqrt(1 - abar_t)
eps) / sqrt(abar_t) into Eq. 7 gives coefficient (1/sqrt(alpha_t)) of x_t and
-beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) of eps (using abar_t = alpha_t abar_{t-1}). The model is
the same family of Gaussians with a different parameterization of the mean, so every term L_{t-1} is
KL(q(x_{t-1} | x_t, x_0) || N(mu_theta, sigma_t^2)) as before; in terms of the x_0 error,
L_{t-1} = coef_x0_t^2 / (2 sigma_t^2) ||x_0 - x0_theta||^2 + D C_t. The ``simple`` objective's weights
1 / (T w_t) turn that into the eps-MSE of the implied eps (Algorithm 1's loss).

Variances (``large``/``small``), prior, decoder, both forms, clipping and sampling are inherited from
:class:`~pyro_ddpm.models.ReverseProcess`; the network is stored as ``.eps`` (its Pyro name) though it
predicts x_0.
"""

from __future__ import annotations

import torch

from pyro_ddpm.registry import MODELS

from .reverse_process import ReverseProcess


@MODELS.register
class X0PredictionReverseProcess(ReverseProcess):
    """p_theta(x_{t-1} | x_t) centred on the forward posterior mean at the network's prediction of x_0."""

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0_theta(x_t, t): the network's output itself."""
        return out

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The eps implied by x0_theta (Eq. 4 solved for the noise)."""
        return self.schedule.eps_from_x0(x_t, t, self.predict_x0(x_t, t, out))

    def mean(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """mu_tilde_t(x_t, x0_theta) (Eq. 7)."""
        return self.mean_at_x0(x_t, t, out)
