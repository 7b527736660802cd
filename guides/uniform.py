"""Uniform diffusion (D3PM, Austin et al. 2021, section 3.2): each element is resampled uniformly.

Per element over the K levels, with keep probabilities alpha_t (alpha_0 = 1, alpha_T = 0;
:func:`~pyro_ddpm.discrete.alphas`) and the one-step keep probability a_t = alpha_t / alpha_{t-1},
the transition Q_t = a_t I + (1 - a_t) 11^T / K composes to

    q(x_t | x_0)            = alpha_t [x_t = x_0] + (1 - alpha_t) / K
    q(x_{t-1} | x_t, x_0)   ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0)
                            = (a_t [x_t = x_{t-1}] + (1 - a_t)/K) (alpha_{t-1} [x_{t-1} = x_0] + (1 - alpha_{t-1})/K)
    p(x_T)                  = 1 / K                                  (alpha_T = 0: x_T is uniform)
"""

from __future__ import annotations

import torch

from pyro_ddpm.discrete import CategoricalForwardProcess, CategoricalSchedule, floored_log
from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import at


class UniformSchedule(CategoricalSchedule):
    """The uniform process's probabilities over the K levels (no mask state)."""

    def marginal(self, x0, t, dtype):
        a = at(self.alpha, t, x0, dtype).unsqueeze(-1)
        return a * self.onehot(x0, dtype) + (1.0 - a) / self.levels

    def posterior(self, x_t, x0, t, dtype):
        a_prev = at(self.alpha, t - 1, x_t, torch.float64).unsqueeze(-1)
        step = torch.where(
            a_prev > 0, at(self.alpha, t, x_t, torch.float64).unsqueeze(-1) / a_prev, torch.zeros_like(a_prev)
        )
        K = self.levels
        joint = (step.to(dtype) * self.onehot(x_t.expand_as(x0), dtype) + (1.0 - step.to(dtype)) / K) * (
            a_prev.to(dtype) * self.onehot(x0, dtype) + (1.0 - a_prev.to(dtype)) / K
        )
        return joint / joint.sum(-1, keepdim=True)

    def prior(self, dtype):
        return torch.full((self.levels,), 1.0 / self.levels, dtype=dtype, device=self.alpha.device)

    def evidence(self, x_t, t, dtype):
        """q(x_t | x_0 = v_k) for every k: alpha_t [v_k = x_t] + (1 - alpha_t) / K."""
        a = at(self.alpha, t, x_t, dtype).unsqueeze(-1)
        return (
            a * (torch.arange(self.levels, device=x_t.device) == x_t.unsqueeze(-1)).to(dtype) + (1.0 - a) / self.levels
        )

    def mixture(self, x_t, log_p0, t):
        """In closed form, O(K) per element: with A_j = q(x_t | x_{t-1} = j), B_jk = q(x_{t-1} = j | x_0 = k) and
        Z_k = q(x_t | x_0 = k),

            sum_k p_k A_j B_jk / Z_k = A_j (alpha_{t-1} p_j / Z_j + (1 - alpha_{t-1}) / K sum_k p_k / Z_k).
        """
        dtype, K = log_p0.dtype, self.levels
        a_prev = at(self.alpha, t - 1, x_t, torch.float64).unsqueeze(-1)
        step = (at(self.alpha, t, x_t, torch.float64).unsqueeze(-1) / a_prev).to(dtype)
        same = (torch.arange(K, device=x_t.device) == x_t.unsqueeze(-1)).to(dtype)
        log_A = floored_log(step * same + (1.0 - step) / K)
        log_r = log_p0 - self.evidence(x_t, t, dtype).log()
        log_R = torch.logsumexp(log_r, dim=-1, keepdim=True)
        spread = ((1.0 - a_prev) / K).to(dtype)
        return log_A + torch.logaddexp(a_prev.to(dtype).log() + log_r, spread.log() + log_R)


@GUIDES.register
class UniformForwardProcess(CategoricalForwardProcess):
    """The uniform forward process over the data's K levels (see the module docstring).

    :param T: the number of steps.
    :param levels: K.
    :param schedule: the schedule of alpha_t (``linear`` or ``cosine``).
    :param event_dim: the number of data dimensions.
    """

    schedule_class = UniformSchedule
