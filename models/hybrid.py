"""The training program of the hybrid objective L_hybrid = L_simple + lambda L_vlb (Nichol and Dhariwal
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
Timesteps must be uniform: the factor is not reweighted by an importance proposal (the trainer refuses
``timesteps="importance"`` with this objective).

One network call per training step gives eps_theta and v_theta for all pairs. The chain form
(``chain``) is the learned-variance model's, unchanged: evaluate and sample with it.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled

from pyro_ddpm import protocol
from pyro_ddpm.likelihoods import ScoredWhere
from pyro_ddpm.schedule import at

from .learned_variance import LearnedVarianceReverseProcess

L_SIMPLE = "L_simple"


class HybridReverseProcess(LearnedVarianceReverseProcess):
    """A learned-variance reverse process whose training form is the hybrid objective's surrogate."""

    @classmethod
    def from_model(cls, model: LearnedVarianceReverseProcess) -> "HybridReverseProcess":
        """The hybrid program around ``model``'s network, schedule, likelihood and shape (all shared)."""
        if not isinstance(model, LearnedVarianceReverseProcess):
            raise ValueError(f"the hybrid objective needs a learned-variance model, got {type(model).__name__}")
        new = cls(model.eps, model.schedule, model.variance, model.likelihood, shape=model.shape)
        new.autocast = model.autocast
        return new

    def per_timestep(self, x0: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """L_T, then per (image, t) pair: L_simple's eps error and the weighted L_vlb term at sg(mu).

        ``weight`` (length T + 1) scales the L_vlb sites only: lambda for the hybrid objective.
        """
        pyro.module("eps", self.eps)
        self._check_data(x0)
        if is_validation_enabled():  # before weight[t] indexes with t
            self.schedule.check_timesteps(t)
        B = x0.shape[0]
        with pyro.plate(protocol.IMAGES, B):
            pyro.sample(protocol.X_T, self.prior(B, x0))
        x0, t = protocol.pairs(x0, t)
        s = self.schedule
        with protocol.timestep_plate(t.view(B, -1), self.T):
            with protocol.weighted(weight, t, x0), poutine.mask(mask=False):
                x_t = pyro.sample(protocol.X_t, self.prior(x0.shape[0], x0))
            eps_hat, v = self.predict(x_t, t)
            eps = (x_t - at(s.sqrt_abar, t, x_t) * x0) / at(s.sqrt_one_minus_abar, t, x_t)
            pyro.factor(L_SIMPLE, -(eps - eps_hat).pow(2).flatten(1).sum(1) / self.T)
            loc = self.mean_from_eps(x_t, t, eps_hat).detach()  # stop-gradient: L_vlb trains the variance only
            scale = self.scale_from_v(x_t, t, v)
            with protocol.weighted(weight, t, x0):
                with poutine.mask(mask=t > 1):
                    pyro.sample(protocol.X_PREV, self._event(dist.Normal(loc, scale)))
                decoder = ScoredWhere(self.likelihood, loc, scale, where=t == 1)
                with poutine.mask(mask=t == 1):
                    pyro.sample(protocol.X_0, self._event(decoder), obs=x0)
