"""The grid-posterior reverse process with the moment-matched (analytic) variance of its own posterior.

The true reverse transition is a mixture over x_0: q(x_{t-1} | x_t) = E_{q(x_0 | x_t)} q(x_{t-1} | x_t, x_0),
with q(x_{t-1} | x_t, x_0) = N(mu_tilde_t(x_t, x_0), beta_tilde_t) (Eqs. 6, 7). Per dimension, the Gaussian
N(m, s^2) that minimizes the expected term L_{t-1} = E_{x_0 | x_t} KL(q(x_{t-1} | x_t, x_0) || N(m, s^2)) is
found by differentiating the KL 1/2 [log(s^2 / bt) + (bt + (mu_tilde - m)^2) / s^2 - 1] in expectation:

    m   = E[mu_tilde_t(x_t, x_0) | x_t] = coef_x0_t E[x_0 | x_t] + coef_xt_t x_t          (Eq. 7 at x0_hat)
    s^2 = beta_tilde_t + E[(mu_tilde - m)^2 | x_t] = beta_tilde_t + coef_x0_t^2 Var[x_0 | x_t]

(mu_tilde is affine in x_0 with slope coef_x0_t) -- the analytic optimal variance of Bao et al. (2022,
Analytic-DPM), here per pixel and from the same grid posterior that gives the mean
(:class:`~pyro_ddpm.models.GridPosteriorReverseProcess`): where the posterior is sure (small t) the
variance falls to beta_tilde_t, where it is spread out the transition widens to cover the mixture.

t = 1: the decoder's scale. beta_tilde_1 = 0 and coef_x0_1 = 1; as the fixed variances do, the floor is
the clipped beta_tilde_2 (the official code's replacement), so sigma_1^2 = beta_tilde_2 + Var[x_0 | x_1].

The variance rule is this class's own (``variance = "moment_matched"``, the only one it implements):
``sigma2`` is refused (it depends on x_t), and :meth:`transition` returns the scale the sites use.
Objectives: ``elbo`` (the bound with this variance, whose gradient reaches the logits through both the
mean and the variance) and ``simple``: Algorithm 1's eps-MSE of the implied eps, trained on the mean
alone (the grid-posterior program with the fixed ``small`` variance, lambda_t = 1/(T w_t)); the variance
needs no training of its own, it is read off the posterior.
"""

from __future__ import annotations

import torch

from pyro_ddpm.registry import MODELS
from pyro_ddpm.schedule import at

from .grid_posterior import GridPosteriorReverseProcess, posterior_moments

MOMENT_MATCHED = "moment_matched"


@MODELS.register
class MomentMatchedGridReverseProcess(GridPosteriorReverseProcess):
    """Grid-posterior mean (Eq. 7 at E[x_0 | x_t]) and per-pixel variance beta_tilde_t + coef_x0_t^2 Var[x_0 | x_t]."""

    variances = (MOMENT_MATCHED,)
    # the program with the same mean and a fixed variance (what ``simple`` trains)
    fixed_variance_class = GridPosteriorReverseProcess

    @property
    def sigma2(self) -> torch.Tensor:
        raise ValueError(
            f"{type(self).__name__}: sigma_t^2 is moment-matched per pixel and depends on x_t; use transition(x_t, t)"
        )

    def training_program(self, objective: str):
        """``elbo``: this model. ``simple``: the grid-posterior program with the fixed small variance around
        the same network, with its lambda_t = 1/(T w_t): the eps-MSE of the implied eps."""
        if objective == "simple":
            mean_only = self.fixed_variance_class(self.eps, self.schedule, "small", self.likelihood, self.shape)
            mean_only.autocast = self.autocast
            return mean_only.training_program("simple")
        return super().training_program(objective)

    def mean_and_scale(
        self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one posterior: mu_tilde_t(x_t, E[x_0 | x_t]) and the scale of :meth:`scale`."""
        x0_hat, var = posterior_moments(self.log_posterior(x_t, t, out), self.levels)
        return self.mean_at(x_t, t, x0_hat), self._scale_at(x_t, t, var)

    def scale(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """sqrt(beta_tilde_t + coef_x0_t^2 Var[x_0 | x_t]), with beta_tilde_1 clipped to beta_tilde_2."""
        return self._scale_at(x_t, t, posterior_moments(self.log_posterior(x_t, t, out), self.levels)[1])

    def _scale_at(self, x_t: torch.Tensor, t: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        s = self.schedule
        return (at(s.sigma2_small, t, x_t) + at(s.coef_x0, t, x_t) ** 2 * var).sqrt()
