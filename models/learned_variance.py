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
The bound is the same Eq. 5 with these transitions; the class trains on ``elbo`` (the bound) or
``hybrid`` (below). There is no per-t weight w_t, since sigma_theta depends on x_t, so ``simple``
does not apply (refused).

The hybrid objective
--------------------
The training program of the hybrid objective L_hybrid = L_simple + lambda L_vlb (Nichol and Dhariwal
2021, section 3.1, lambda = 0.001) for the learned-variance reverse process.

L_simple trains the mean only and L_vlb the variance only: in L_vlb the mean is used with a stop-gradient.
As a Pyro program this is the learned-variance model's per-timestep form with two changes, so that the
same guide (:class:`~pyro_ddpm.guides.ForwardProcess`, unchanged) pairs with it:

- the sites ``x_{t-1}`` and ``x_0`` score p_theta with the mean detached, N(sg(mu_theta), sigma_theta^2)
  and the decoder at (sg(mu_theta(x_1, 1)), sigma_theta(x_1, 1)); the objective's per-timestep
  ``weight`` (lambda at every t, see :func:`pyro_ddpm.elbo.objective`) scales them in both programs,
  as the protocol requires for latent sites (``TraceMeanField_ELBO`` takes a KL's scale from the guide);
- a ``pyro.factor`` site ``L_simple`` adds -(1/T) ||eps - eps_theta(x_t, t)||^2 per pair, with
  eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) the noise of the guide's x_t (Eq. 4). Under the
  pair plate's T/K scale the K pairs of an image give (1/K) sum_k ||eps - eps_theta||^2: Algorithm 1's
  loss, L_simple. It is not weighted by lambda.

Why a factor with the eps error rather than the KL against a fixed-variance Gaussian scaled by
lambda_t = 1/(T w_t), as the ``simple`` objective does: by Eq. 12 the two differ by D C_t / (T w_t), a
constant, so their gradients are equal; the factor needs no fixed variance the learned model does not
have, keeps the mean's gradient independent of the variance, and its value is L_simple itself.

t = 1, consistently with ``simple``: the L_simple part includes the eps error at t = 1 (``simple``'s t = 1
term is -log N(x_0; mu_theta(x_1, 1), sigma_1^2) = w_1 ||eps - eps_theta||^2 + const, the paper's remark
after Eq. 14). The L_vlb part's t = 1 term is the model's decoder L_0 at the detached mean, so it
trains the decoder's variance sigma_theta(x_1, 1), as improved-diffusion's vb term does at its t = 0.
L_T (site ``x_T``) has no parameters; the protocol keeps it outside the weight, so it enters with
weight 1 and only shifts the value.

Units: here both parts are sums over the D dimensions in nats, and per pair the ratio of the L_vlb
weight to the L_simple weight is lambda T = T / 1000. improved-diffusion averages both over dimensions
(the same factor 1/D) but takes its vb term in bits (KL / ln 2) scaled by T / 1000, so its L_vlb weighs
1 / ln 2 ~ 1.44 times as much relative to L_simple as here.
With importance-sampled timesteps the trainer passes weight = lambda / (T p_t); the factor is scaled by
weight / lambda = 1 / (T p_t), so both parts stay unbiased (with uniform timesteps that scale is 1).

One network call per training step gives eps_theta and v_theta for all pairs. The chain form
(``chain``) is the learned-variance model's, unchanged: evaluate and sample with it.

"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pyro_ddpm import protocol
from pyro_ddpm.programs import ScoredWhere
from pyro_ddpm.protocol import DataSpec
from pyro_ddpm.registry import MODELS

from .reverse_process import ReverseProcess

LEARNED = "learned"
HYBRID_LAMBDA = 1e-3  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol and Dhariwal 2021, section 3.1)
L_SIMPLE = "L_simple"


def _log_at(constant: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log(constant[t]) (taken in the constant's float64, then cast) shaped to broadcast against ``x``."""
    c = constant[t].log().to(dtype=x.dtype)
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


@MODELS.register
class LearnedVarianceReverseProcess(ReverseProcess):
    """p_theta(x_{t-1} | x_t) with eps_theta's mean (Eq. 11) and a variance interpolated per dimension.

    :param eps: a network ``eps(x_t, t)`` returning shape (B, 2C, ...) for x_t of shape (B, C, ...):
        eps_theta, then v_theta, concatenated along dimension 1.
    :param variance: ``"learned"`` (the only rule this class implements).

    Other parameters as for :class:`~pyro_ddpm.models.ReverseProcess`.
    """

    variances = (LEARNED,)
    objectives = ("elbo", "hybrid")

    @classmethod
    def output_channels(cls, data: DataSpec) -> int:
        """2C: eps_theta and v_theta."""
        return 2 * data.channels

    @property
    def sigma2(self) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__}: sigma_t^2 is learned and depends on x_t; use transition(x_t, t)")

    def training_program(self, objective: str):
        """``elbo``: this model. ``hybrid``: :class:`HybridReverseProcess` around the same network, with
        lambda at every t as the weight of its L_vlb sites."""
        if objective == "hybrid":
            weight = torch.full_like(self.schedule.beta.detach(), HYBRID_LAMBDA)
            weight[0] = 0.0
            return HybridReverseProcess.from_model(self), weight
        if objective == "simple":
            raise ValueError(
                f"objective 'simple' needs a fixed variance (its weights 1 / (T w_t) depend on sigma_t); "
                f"{type(self).__name__} learns its variance: use one of {list(self.objectives)}"
            )
        return super().training_program(objective)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eps_theta and v_theta from the network output (B, 2C, ...), each shaped like x_t."""
        eps, v = out.chunk(2, dim=1)
        return eps, v

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return super().predict_x0(x_t, t, self.split(out)[0])

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.split(out)[0]

    def mean(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t) (Eq. 11) from the eps half of the output."""
        if self.clip_denoised:
            return self.mean_at_x0(x_t, t, out)
        return self.schedule.mean_from_eps(x_t, t, self.eps_hat(x_t, t, out))

    def scale(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """sigma_theta = exp(log sigma_theta^2 / 2) with the interpolation of N&D Eq. 15 (clipped lower end)."""
        s = self.schedule
        v = self.split(out)[1]
        log_hi = _log_at(s.beta, t, x_t)
        log_lo = _log_at(s.variance("small").sigma2, t, x_t)  # beta_tilde_t, beta_tilde_2 at t = 1
        frac = (v + 1.0) / 2.0
        return torch.exp(0.5 * (frac * log_hi + (1.0 - frac) * log_lo))


class HybridReverseProcess(LearnedVarianceReverseProcess):
    """The hybrid objective's training program around a learned-variance model (see the module docstring).

    Its ``per_timestep`` is the surrogate L_simple + lambda L_vlb(sg(mu)); its chain form is the model's.
    """

    @classmethod
    def from_model(cls, model: LearnedVarianceReverseProcess) -> HybridReverseProcess:
        """The hybrid program around ``model``'s network, schedule, likelihood and shape (all shared)."""
        if not isinstance(model, LearnedVarianceReverseProcess):
            raise ValueError(f"the hybrid objective needs a learned-variance model, got {type(model).__name__}")
        new = cls(model.eps, model.schedule, model.variance, model.likelihood, shape=model.shape)
        new.autocast = model.autocast
        return new

    def per_timestep(self, x0: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """L_T, then per (image, t) pair: L_simple's eps error and the weighted L_vlb term at sg(mu).

        ``weight`` (length T + 1) scales the L_vlb sites: lambda for the hybrid objective (times 1 / (T p_t)
        under importance sampling); the L_simple factor is scaled by weight / lambda.
        """
        B, x0, t = self.begin_per_timestep(x0, t)
        s = self.schedule
        factor_weight = None if weight is None else weight / HYBRID_LAMBDA
        with protocol.timestep_plate(t.view(B, -1), self.T):
            with protocol.weighted(weight, t, x0), poutine.mask(mask=False):
                x_t = pyro.sample(protocol.X_t, self.prior(x0.shape[0], x0))
            out = self.network_output(x_t, t)
            eps_hat = self.eps_hat(x_t, t, out)
            with protocol.weighted(factor_weight, t, x0):
                pyro.factor(L_SIMPLE, -(s.eps_from_x0(x_t, t, x0) - eps_hat).pow(2).flatten(1).sum(1) / self.T)
            loc = s.mean_from_eps(x_t, t, eps_hat).detach()  # stop-gradient: L_vlb trains the variance only
            scale = self.scale(x_t, t, out)
            with protocol.weighted(weight, t, x0):
                with poutine.mask(mask=t > 1):
                    pyro.sample(protocol.X_PREV, self._event(dist.Normal(loc, scale)))
                decoder = ScoredWhere(lambda w: self.likelihood(loc[w], scale[w]), t == 1, loc.shape, dtype=loc.dtype)
                with poutine.mask(mask=t == 1):
                    pyro.sample(protocol.X_0, self._event(decoder), obs=x0)
