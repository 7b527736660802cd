"""Masked (absorbing-state) diffusion: each element is kept or replaced by a mask state M for good.

The forward process of D3PM's absorbing variant (Austin et al. 2021) and of MD4 (Shi et al. 2024),
in discrete time t = 1..T with keep probabilities alpha_t (alpha_0 = 1, alpha_T = 0;
:func:`~pyro_ddpm.discrete.alphas`). Per element, over the K levels and M:

    q(x_t | x_0)            = alpha_t [x_t = x_0] + (1 - alpha_t) [x_t = M]
    q(x_{t-1} | x_t = M, x_0) = (alpha_{t-1} - alpha_t) / (1 - alpha_t) [x_{t-1} = x_0]
                              + (1 - alpha_{t-1}) / (1 - alpha_t) [x_{t-1} = M]
    q(x_{t-1} | x_t = x_0, x_0) = [x_{t-1} = x_t]                  (an unmasked element stays)
    p(x_T)                  = [x_T = M]

With the x_0-parameterized model (:class:`~pyro_ddpm.models.CategoricalReverseProcess`), the KL of a
masked element is w_t = (alpha_{t-1} - alpha_t) / (1 - alpha_t) times its cross-entropy -log p(x_0 | x_t),
and an unmasked one costs nothing: the bound is a weighted cross-entropy over the masked elements
(``docs/math.md``), whose weights :attr:`MaskingSchedule.weight` gives.
"""

from __future__ import annotations

import torch

from pyro_ddpm.discrete import CategoricalForwardProcess, CategoricalSchedule, floored_log
from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import at


class MaskingSchedule(CategoricalSchedule):
    """The absorbing process's probabilities: K levels and the mask state M = K."""

    @property
    def mask(self) -> int:
        return self.levels

    def marginal(self, x0, t, dtype):
        a = at(self.alpha, t, x0, dtype).unsqueeze(-1)
        return a * self.onehot(x0, dtype) + (1.0 - a) * self.onehot(torch.full_like(x0, self.mask), dtype)

    def posterior(self, x_t, x0, t, dtype):
        a = at(self.alpha, t, x_t, torch.float64).unsqueeze(-1)
        a_prev = at(self.alpha, t - 1, x_t, torch.float64).unsqueeze(-1)
        unmask = ((a_prev - a) / (1.0 - a)).to(dtype)
        masked = unmask * self.onehot(x0, dtype) + (1.0 - unmask) * self.onehot(torch.full_like(x0, self.mask), dtype)
        return torch.where((x_t == self.mask).unsqueeze(-1), masked, self.onehot(x_t.expand_as(x0), dtype))

    def prior(self, dtype):
        return self.onehot(torch.tensor(self.mask, device=self.alpha.device), dtype)

    def evidence(self, x_t, t, dtype):
        """q(x_t | x_0 = v_k) for every k: 1 - alpha_t for a masked x_t, alpha_t [v_k = x_t] otherwise."""
        a = at(self.alpha, t, x_t, dtype).unsqueeze(-1)
        same = (torch.arange(self.levels, device=x_t.device) == x_t.unsqueeze(-1)).to(dtype)
        return torch.where((x_t == self.mask).unsqueeze(-1), 1.0 - a, a * same)

    def mixture(self, x_t, log_p0, t):
        """In closed form: log w_t + log p(x_0 = v_k) at the levels and log(1 - w_t) at M for a masked x_t;
        an unmasked x_t is kept."""
        dtype = log_p0.dtype
        w = at(self.weight, t, x_t, dtype).unsqueeze(-1)
        to_mask = floored_log(1.0 - w).expand(*log_p0.shape[:-1], 1)
        masked = torch.cat([floored_log(w) + log_p0, to_mask], dim=-1)
        return torch.where((x_t == self.mask).unsqueeze(-1), masked, floored_log(self.onehot(x_t, dtype)))

    @property
    def weight(self) -> torch.Tensor:
        """w_t = (alpha_{t-1} - alpha_t) / (1 - alpha_t), t = 1..T (index 0 unused): the bound's weight on the
        cross-entropy of each masked element at step t (w_1 = 1: L_0 is the cross-entropy itself)."""
        a = self.alpha
        w = torch.zeros_like(a)
        w[1:] = (a[:-1] - a[1:]) / (1.0 - a[1:])
        return w


@GUIDES.register
class MaskedForwardProcess(CategoricalForwardProcess):
    """The absorbing forward process over the data's K levels (see the module docstring).

    :param T: the number of steps.
    :param levels: K.
    :param schedule: the masking schedule (``linear`` or ``cosine``).
    :param event_dim: the number of data dimensions.
    """

    schedule_class = MaskingSchedule
