"""The reverse process for data on a grid: the network predicts x_0 as a posterior over the K grid values.

Data on the K-level grid v_k = -1 + 2k/(K - 1) (K from the decoder: 17 for the sklearn digits, 256 for
8-bit images, 2 for binary data) give the denoiser a structure an eps network has to learn: at small t
the noise sqrt(1 - abar_t) is far below the grid spacing 2/(K - 1), so the best prediction of x_0 just
snaps each pixel to its nearest value, a sawtooth of slope ~ 1/sqrt(1 - abar_t) in x_t. Writing the
posterior of one pixel's x_0 given x_t with Bayes' rule,

    q(x_0^i = v_k | x_t) ∝ q(x_0^i = v_k | x_t^{-i}) N(x_t^i; sqrt(abar_t) v_k, (1 - abar_t))      (Eq. 4)

(the pixel's own noisy value enters only through its likelihood, given the rest of x_t), the network
outputs the first factor as K logits per pixel and the second is added exactly:

    log w_k = l_k(x_t, t) - (x_t^i - sqrt(abar_t) v_k)^2 / (2 (1 - abar_t)),   w = softmax_k(log w)
    x0_hat^i = sum_k w_k v_k                                     (the posterior mean of x_0^i)
    mu_theta(x_t, t) = mu_tilde_t(x_t, x0_hat) = coef_x0_t x0_hat + coef_xt_t x_t                 (Eq. 7)

so at small t the prediction is exact by construction (the likelihood term dominates and w is one-hot
on the nearest grid value whatever the logits), and the network's work is where it belongs: at large
t, where the likelihood is flat and the logits carry the data's structure. With logits that do not
depend on x_t (e.g. the log of per-pixel frequencies), the model is the exact reverse of independent
per-pixel categorical data up to the Gaussian form of its transitions.

The rest is the reverse process of :class:`~pyro_ddpm.models.ReverseProcess`: the fixed variance
(``large`` or ``small``), the prior, the decoder at (mu_theta(x_1, 1), sigma_1) (at t = 1 the mean is
x0_hat itself: coef_x0_1 = 1, coef_xt_1 = 0), both forms, sampling, DDIM. ``x0_hat`` lies in [-1, 1]
(a convex combination of grid values), so ``clip_denoised`` leaves it unchanged. Objectives: ``elbo``
(the bound) and ``simple`` (Algorithm 1's eps-MSE of the eps this x0_hat implies, eps = (x_t -
sqrt(abar_t) x0_hat) / sqrt(1 - abar_t): lambda_t = 1/(T w_t) of the fixed variance, as for every
fixed-variance model).

Network output: K * C channels for data with C channels (flat data (D,): K * D features), read as
(C, K) per position: channel c's logits are channels c*K .. c*K + K - 1.
"""

from __future__ import annotations

import torch

from pyro_ddpm import grid
from pyro_ddpm.protocol import DataSpec
from pyro_ddpm.registry import MODELS
from pyro_ddpm.schedule import at

from .reverse_process import ReverseProcess


def grid_values(levels: int, like: torch.Tensor) -> torch.Tensor:
    """v_k = -1 + 2k/(K - 1), k = 0..K-1 (:func:`pyro_ddpm.grid.values`), in ``like``'s dtype and device."""
    return grid.values(levels, like.dtype, like.device)


def grid_posterior(
    logits: torch.Tensor, x_t: torch.Tensor, sqrt_abar: torch.Tensor, one_minus_abar: torch.Tensor, levels: int
) -> torch.Tensor:
    """log w_k = log softmax_k(l_k - (x_t - sqrt(abar_t) v_k)^2 / (2 (1 - abar_t))): (B, C, K, ...) for x_t (B, C, ...).

    :param logits: (B, C * K, ...), channel c's K logits contiguous.
    :param sqrt_abar, one_minus_abar: broadcastable against x_t (B, 1, ...).
    """
    B, C = x_t.shape[:2]
    l = logits.reshape(B, C, levels, *x_t.shape[2:])
    v = grid_values(levels, x_t).reshape((1, 1, levels) + (1,) * (x_t.dim() - 2))
    sq = (x_t.unsqueeze(2) - sqrt_abar.unsqueeze(2) * v) ** 2
    return torch.log_softmax(l - sq / (2.0 * one_minus_abar.unsqueeze(2)), dim=2)


def posterior_moments(log_w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x_0 | x_t] and Var[x_0 | x_t] per pixel from the log posterior weights (B, C, K, ...)."""
    w = log_w.exp()
    v = grid_values(levels, log_w).reshape((1, 1, levels) + (1,) * (log_w.dim() - 3))
    mean = (w * v).sum(2)
    var = (w * (v - mean.unsqueeze(2)) ** 2).sum(2)  # centred: no cancellation of E[x^2] - E[x]^2
    return mean, var


@MODELS.register
class GridPosteriorReverseProcess(ReverseProcess):
    """p_theta(x_{t-1} | x_t) centred on Eq. 7's mean at the posterior mean of x_0 over the data's grid.

    Parameters as for :class:`~pyro_ddpm.models.ReverseProcess`; the likelihood must be a decoder of
    grid data (its ``levels`` K >= 2), and the network returns K logits per data channel.
    """

    def __init__(self, eps, schedule, variance=None, likelihood=None, shape=None, clip_denoised: bool = False):
        super().__init__(eps, schedule, variance, likelihood, shape, clip_denoised)
        if self.data.levels < 2:
            raise ValueError(
                f"{type(self).__name__} needs grid data: its decoder {self.likelihood!r} has no levels "
                "(continuous data); use a decoder of quantized data"
            )
        self.levels = self.data.levels

    @classmethod
    def output_channels(cls, data: DataSpec) -> int:
        """:meth:`outputs_per_channel` per data channel, for grid data only."""
        if int(data.levels) < 2:
            raise ValueError(f"{cls.__name__} needs grid data (levels K >= 2), got levels = {data.levels}")
        return cls.outputs_per_channel(int(data.levels)) * data.channels

    @classmethod
    def outputs_per_channel(cls, levels: int) -> int:
        """Network channels per data channel: the K logits themselves here."""
        return levels

    def prior_logits(self, out: torch.Tensor) -> torch.Tensor:
        """The logits l_k(x_t, t) of Eq. 4's first factor, (B, C * K, ...), from the network output: the
        output itself here; a class that parameterizes the K logits otherwise reads them off its output."""
        return out

    def log_posterior(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log q_theta(x_0^i = v_k | x_t): (B, C, K, ...)."""
        s = self.schedule
        logits = self.prior_logits(out)
        return grid_posterior(logits, x_t, at(s.sqrt_abar, t, x_t), at(1.0 - s.abar, t, x_t), self.levels)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0_hat = E[x_0 | x_t] under the grid posterior."""
        return posterior_moments(self.log_posterior(x_t, t, out), self.levels)[0]

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The eps x0_hat implies (Eq. 4 solved for the noise)."""
        return self.schedule.eps_from_x0(x_t, t, self.predict_x0(x_t, t, out))

    def mean(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """mu_tilde_t(x_t, x0_hat) (Eq. 7)."""
        return self.mean_at_x0(x_t, t, out)
