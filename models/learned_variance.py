"""The reverse process with a learned variance (Nichol and Dhariwal 2021, "improved DDPM").

The network outputs twice the data's channels (for flat data of shape (D,): 2D features): along
dimension 1, the first half is eps_theta(x_t, t), the second a raw v_theta(x_t, t), and

    mu_theta(x_t, t)          = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t)     (Eq. 11)
    frac                      = (v_theta + 1) / 2
    log sigma_theta^2(x_t, t) = frac log beta_t + (1 - frac) log beta_tilde_t       (N&D 2021, Eq. 15)
    p_theta(x_{t-1} | x_t)    = N(mu_theta, sigma_theta^2 I),  p_theta(x_0 | x_1) = the likelihood at
                                (mu_theta(x_1, 1), sigma_theta(x_1, 1))                (Eqs. 1, 13)

v_theta is not clipped: outside [-1, 1] the interpolation extrapolates in log space, as in the
official improved-diffusion code.

t = 1. beta_tilde_1 = 0, so log beta_tilde_1 = -inf. As improved-diffusion does, the lower end uses the
log of the *clipped* posterior variance, beta_tilde_1 replaced by beta_tilde_2 (their
``posterior_log_variance_clipped``; it is this package's sigma_t^2 of the fixed ``small`` variance). The
upper end stays log beta_t at every t, also log beta_1 at t = 1 (their ``log(betas)``). Hence:

- v_theta = -1 gives the fixed ``small`` model at every t (sigma_1^2 = beta_tilde_2 included);
- v_theta = +1 gives the fixed ``large`` model at t >= 2, and at t = 1 the decoder scale sqrt(beta_1)
  instead of the fixed models' sqrt(beta_tilde_2) (the decoder's variance is learned in
  [beta_tilde_2, beta_1]; beta_tilde_2 = beta_1 beta_2 / (1 - abar_2) < beta_1).

``variance`` must be ``"learned"``: the name recorded in checkpoints and configs for this model.
The bound is the same Eq. 5 with these transitions (train it with the ``elbo`` objective or the
hybrid objective of :func:`pyro_ddpm.elbo.objective`); there is no per-t weight w_t, since
sigma_theta depends on x_t, so ``simple`` does not apply.
"""

from __future__ import annotations

import inspect

import torch

from pyro_ddpm.nets import MLP, UNet
from pyro_ddpm.schedule import Schedule

from .reverse_process import ReverseProcess

LEARNED = "learned"


def _log_at(constant: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log(constant[t]) (taken in the constant's float64, then cast) shaped to broadcast against ``x``."""
    c = constant[t].log().to(dtype=x.dtype)
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


class LearnedVarianceReverseProcess(ReverseProcess):
    """p_theta(x_{t-1} | x_t) with eps_theta's mean (Eq. 11) and a variance interpolated per dimension.

    :param eps: a network ``eps(x_t, t)`` returning shape (B, 2C, ...) for x_t of shape (B, C, ...):
        eps_theta, then v_theta, concatenated along dimension 1.
    :param variance: must be ``"learned"``.
    Other parameters as for :class:`~pyro_ddpm.models.ReverseProcess`.
    """

    def __init__(self, eps, schedule: Schedule, variance: str = LEARNED, likelihood=None, shape=None):
        super().__init__(eps, schedule, variance, likelihood, shape)

    @classmethod
    def check_variance(cls, schedule: Schedule, variance: str) -> None:
        if variance != LEARNED:
            raise ValueError(f"{cls.__name__}: variance must be {LEARNED!r} (the network predicts it), got {variance!r}")

    @classmethod
    def network_config(cls, preset: dict) -> dict:
        """The preset with twice the input's channels out (``out_channels`` / ``out_dim``): eps and v."""
        preset = dict(preset)
        kind = preset.get("kind")
        if kind == "unet":
            channels = preset.get("in_channels", inspect.signature(UNet).parameters["in_channels"].default)
            preset["out_channels"] = 2 * int(channels)
        elif kind == "mlp":
            dim = preset.get("dim", inspect.signature(MLP).parameters["dim"].default)
            preset["out_dim"] = 2 * int(dim)
        else:
            raise ValueError(f"{cls.__name__}: cannot double the output of network kind {kind!r}; expected 'unet' or 'mlp'")
        return preset

    @property
    def sigma2(self) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__}: sigma_t^2 is learned and depends on x_t; use transition(x_t, t)")

    def output_shape(self, input_shape: torch.Size) -> tuple[int, ...]:
        """(B, 2C, ...) for an input (B, C, ...): eps_theta and v_theta."""
        return (input_shape[0], 2 * input_shape[1]) + tuple(input_shape[2:])

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eps_theta(x_t, t) and v_theta(x_t, t) from one network call, each shaped like x_t."""
        eps, v = self.network_output(x_t, t).to(x_t.dtype).chunk(2, dim=1)
        return eps, v

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.predict(x_t, t)[0]

    def scale_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """sigma_theta = exp(log sigma_theta^2 / 2) with the interpolation of N&D Eq. 15 (clipped lower end)."""
        s = self.schedule
        log_hi = _log_at(s.beta, t, x_t)
        log_lo = _log_at(s.variance("small").sigma2, t, x_t)  # beta_tilde_t, beta_tilde_2 at t = 1
        frac = (v + 1.0) / 2.0
        return torch.exp(0.5 * (frac * log_hi + (1.0 - frac) * log_lo))

    def transition(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean mu_theta(x_t, t) (Eq. 11) and the learned scale sigma_theta(x_t, t)."""
        eps, v = self.predict(x_t, t)
        return self.mean_from_eps(x_t, t, eps), self.scale_from_v(x_t, t, v)
