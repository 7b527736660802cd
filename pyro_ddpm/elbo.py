"""ELBO bookkeeping: the bound's terms one by one, and the two training objectives.

The bound (Eq. 5)   L = L_T + sum_{t=2}^T L_{t-1} + L_0
is what ``pyro.infer.TraceMeanField_ELBO`` computes for a model/guide pair following
:mod:`pyro_ddpm.protocol`: each latent site contributes its analytic KL, the observed ``x_0`` its
negative log-likelihood. :class:`TermwiseELBO` returns those contributions unsummed.

Objectives (Eqs. 12 and 14), for the same model and guide:

- ``elbo``: the true bound, every term with weight 1.
- ``simple``: L_simple. By Eq. 12, L_{t-1} = w_t E||eps - eps_theta||^2 + D C_t, so scaling each
  pair's terms by lambda_t = 1 / (T w_t) with ``poutine.scale`` turns the per-timestep estimate
  (T/K) sum_k L_{t_k - 1} into (1/K) sum_k ||eps - eps_theta(x_t, t_k)||^2 plus constants, whose
  gradient is Algorithm 1's. At t = 1 L_simple uses the eps error too, which is the t = 1 term of
  the model whose decoder is the Gaussian transition density itself (the paper's remark after
  Eq. 14): -log N(x_0; mu_theta(x_1, 1), sigma_1^2) = w_1 ||eps - eps_theta||^2 + const. The
  constants (D C_t / (T w_t) and the Gaussian's normalizer) stay in the reported loss value; they
  carry no gradient. The true bound of a model trained on L_simple is measured with the evaluator.
- ``hybrid`` (learned-variance models only; Nichol and Dhariwal 2021): L_simple + lambda L_vlb with
  lambda = 0.001 and a stop-gradient on the mean in L_vlb. The program is
  :class:`~pyro_ddpm.models.HybridReverseProcess` (its docstring derives it and its t = 1 term); the
  weight is lambda at every t, which scales the L_vlb sites in both programs.

``simple`` needs a fixed variance (lambda_t = 1 / (T w_t) depends on sigma_t), ``hybrid`` a learned one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan
from torch.distributions import kl_divergence

from pyro_ddpm.likelihoods import GaussianLikelihood

FIXED_VARIANCE_OBJECTIVES = ("elbo", "simple")  # the objectives of a fixed-variance model
LEARNED_VARIANCE_OBJECTIVES = ("elbo", "hybrid")  # those of a learned-variance model
OBJECTIVES = ("elbo", "simple", "hybrid")
HYBRID_LAMBDA = 1e-3  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol and Dhariwal 2021, section 3.1)


class Term(NamedTuple):
    """One site's contribution: ``value`` (masked, batch-shaped, nats) and the ``scale`` Pyro applies."""

    value: torch.Tensor
    scale: torch.Tensor | float


class TermwiseELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that also returns its terms, one per sample site, unsummed.

    Subclassed because Pyro's ELBOs return only the total, while a diffusion model is read term by
    term (L_T, each L_{t-1}, L_0; rate against distortion). :meth:`terms` takes the traces exactly as
    the loss does (Pyro's own ``_get_trace``, with its model/guide and mean-field checks) and applies
    the same rule per site: KL(guide || model) masked by the guide site's mask for latent sites,
    -log p masked by the model site's mask for observed ones. ``sum(value * scale)`` over all terms is
    the loss of a single particle.

    :meth:`loss_and_grads` (what ``SVI.step`` calls) computes the loss from those same terms and keeps
    the last particle's, detached, in ``last_terms``: the trainer reads each pair's L_{t-1} from it
    for importance sampling without tracing the programs again.
    """

    last_terms: dict | None = None

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            terms = self.terms_from_traces(model_trace, guide_trace)
            loss = loss + self.loss_from_terms(terms) / self.num_particles
        self.last_terms = {name: Term(term.value.detach(), term.scale) for name, term in terms.items()}
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss

    def traces(self, model, guide, *args, **kwargs):
        """The model and guide traces of one particle, as the loss takes them."""
        return self._get_trace(model, guide, args, kwargs)

    def terms(self, model, guide, *args, **kwargs) -> dict[str, Term]:
        return self.terms_from_traces(*self.traces(model, guide, *args, **kwargs))

    def terms_from_traces(self, model_trace, guide_trace) -> dict[str, Term]:
        out = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                mask, scale = site["mask"], site["scale"]
                log_p = site.get("unscaled_log_prob")  # computed by the trace already
                value = -(log_p if log_p is not None else site["fn"].log_prob(site["value"]))
            else:
                guide_site = guide_trace.nodes[name]
                mask, scale = guide_site["mask"], guide_site["scale"]
                value = kl_divergence(guide_site["fn"], site["fn"])
            if mask is False:
                continue
            out[name] = Term(scale_and_mask(value, 1.0, mask), scale)
        return out

    def loss_from_terms(self, terms: dict[str, Term]) -> torch.Tensor:
        return sum((term.value * term.scale).sum() for term in terms.values())


def simple_weights(model) -> torch.Tensor:
    """lambda_t = 1 / (T w_t), t = 1..T (index 0 unused): the scale that turns the bound into L_simple."""
    w = model.schedule.variance(model.variance).w
    weight = torch.zeros_like(w)
    weight[1:] = 1.0 / (model.T * w[1:])
    return weight.detach()  # a reweighting, not a path for gradients into a learned schedule


def hybrid_weights(model) -> torch.Tensor:
    """lambda at t = 1..T (index 0 unused): the scale of the hybrid objective's L_vlb sites."""
    weight = torch.full_like(model.schedule.beta, HYBRID_LAMBDA)
    weight[0] = 0.0
    return weight


def objective(name: str, model):
    """The model and per-timestep weights that SVI optimizes for the objective ``name``.

    ``elbo``: ``(model, None)``. ``simple``: the model with the Gaussian transition density as its
    t = 1 term, sharing the network, and lambda_t = 1 / (T w_t). ``hybrid``: the
    :class:`~pyro_ddpm.models.HybridReverseProcess` around a learned-variance model's network, and
    lambda = :data:`HYBRID_LAMBDA` at every t.
    """
    from pyro_ddpm.models import HybridReverseProcess, LearnedVarianceReverseProcess

    learned = isinstance(model, LearnedVarianceReverseProcess)
    if name == "elbo":
        return model, None
    if name == "simple":
        if learned:
            raise ValueError(
                f"objective 'simple' needs a fixed variance (its weights 1 / (T w_t) depend on sigma_t); "
                f"{type(model).__name__} learns its variance: use one of {LEARNED_VARIANCE_OBJECTIVES}"
            )
        return model.with_likelihood(GaussianLikelihood()), simple_weights(model)
    if name == "hybrid":
        if not learned:
            raise ValueError(
                f"objective 'hybrid' trains a learned variance; {type(model).__name__} has the fixed variance "
                f"{model.variance!r}: use one of {FIXED_VARIANCE_OBJECTIVES}, or LearnedVarianceReverseProcess"
            )
        return HybridReverseProcess.from_model(model), hybrid_weights(model)
    raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
