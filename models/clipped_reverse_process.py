"""The reverse process with a clipped x_0 prediction: the official code's ``clip_denoised=True``.

    x0_hat(x_t, t) = clip((x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t), -1, 1)    (Eq. 15)
    mu_theta(x_t, t) = mu_tilde_t(x_t, x0_hat)                                                   (Eq. 7)

Without the clip this mean equals Eq. 11's (:class:`~pyro_ddpm.models.ReverseProcess`). The official
evaluation of bits/dim and its sampler use the clipped mean; training with the true bound does not.
Everything else (prior, variances, decoder, both forms, sampling) is inherited.
"""

from __future__ import annotations

import torch

from pyro_ddpm.schedule import at

from .reverse_process import ReverseProcess


class ClippedReverseProcess(ReverseProcess):
    """p_theta(x_{t-1} | x_t) centred on the posterior mean at the clipped prediction of x_0."""

    def transition(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.schedule
        eps = self.predict_eps(x_t, t).to(x_t.dtype)
        x0_hat = ((x_t - at(s.sqrt_one_minus_abar, t, x_t) * eps) / at(s.sqrt_abar, t, x_t)).clamp(-1.0, 1.0)
        loc = at(s.coef_x0, t, x_t) * x0_hat + at(s.coef_xt, t, x_t) * x_t
        return loc, at(self.sigma2, t, x_t).sqrt().expand_as(loc)
