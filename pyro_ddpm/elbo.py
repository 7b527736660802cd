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
- further objectives a model class defines itself, e.g. ``hybrid`` of the learned-variance model.

Which objectives a model supports, and what each means for it, is the model class's own declaration
(``objectives`` and ``training_program``); :func:`objective` asks it. ``simple`` needs a fixed
variance (lambda_t = 1 / (T w_t) depends on sigma_t).
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import site_is_subsample
from pyro.util import check_if_enumerated, warn_if_nan
from torch.distributions import kl_divergence

from pyro_ddpm import protocol


class Term(NamedTuple):
    """One site's contribution: ``value`` (masked, batch-shaped, nats), the ``scale`` Pyro applies and the
    names of the plates the site sits in (``protocol.PAIRS`` for the per-pair terms)."""

    value: torch.Tensor
    scale: torch.Tensor | float
    plates: tuple[str, ...] = ()

    @property
    def per_pair(self) -> bool:
        return protocol.PAIRS in self.plates


class TermwiseELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that also returns its terms, one per sample site, unsummed.

    Subclassed because Pyro's ELBOs return only the total, while a diffusion model is read term by
    term (L_T, each L_{t-1}, L_0; rate against distortion). It overrides only the public entry points
    ``loss`` and ``loss_and_grads``. Per site it applies ``TraceMeanField_ELBO``'s rule: the analytic
    KL(guide || model) scaled and masked as the guide site is for a latent site, falling back to
    log q - log p (the guide's entropy term) where no KL is registered; -log p, scaled and masked as
    the model site is, for an observed site or ``pyro.factor``; -log q for an auxiliary guide site.
    ``sum(value * scale)`` over all terms is the loss of one particle.

    The traces are taken as Pyro's ELBOs take them (the guide traced, the model replayed against it).
    Under Pyro's validation that is Pyro's public ``get_importance_trace`` with its checks (sites of the
    model and guide match, site shapes against the plates, no enumerated site, no NaN log-probability),
    and every call also checks the terms' sum against Pyro's own ``TraceMeanField_ELBO`` loss of the same
    traces. Without validation only what the terms read is computed: a latent site's KL, not the
    log-probabilities of both programs at every site (a log-probability where a term needs one).

    :meth:`loss_and_grads` (what ``SVI.step`` calls) keeps the last particle's terms, detached, in
    ``last_terms``: the trainer reads each pair's term from it (for importance sampling and logs)
    without tracing the programs again.

    :param max_plate_nesting: the programs of :mod:`pyro_ddpm.protocol` nest one plate.
    :param register_once: run the programs' module registrations (:func:`pyro_ddpm.protocol.register`)
        under one :class:`~pyro_ddpm.protocol.RegisterOnce` for the life of this ELBO: parameters become
        ``param`` sites on the first step only. For ``SVI`` with an optimizer that keeps stepping every
        parameter it was once given (:class:`~pyro_ddpm.optim.JointOptimizer`, as the trainer's).
    """

    last_terms: dict | None = None

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1, register_once: bool = False, **kwargs):
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)
        self.registration = protocol.RegisterOnce() if register_once else None

    def registered(self, model, guide):
        """The model and the guide, each under this ELBO's :class:`~pyro_ddpm.protocol.RegisterOnce` if it has one."""
        if self.registration is None:
            return model, guide
        return self.registration(model), self.registration(guide)

    def traces(self, model, guide, *args, **kwargs):
        """The model and guide traces of one particle, as Pyro's ELBOs take them (see the class docstring)."""
        model, guide = self.registered(model, guide)
        try:
            if is_validation_enabled():
                model_trace, guide_trace = get_importance_trace(
                    "flat", self.max_plate_nesting, model, guide, args, kwargs
                )
                check_if_enumerated(guide_trace)
            else:
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        except ValueError as e:  # Pyro re-raises with its table of trace shapes appended: the cause names the problem
            raise ValueError(unwrap(e)) from None
        return model_trace, guide_trace

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            loss = (
                sum(
                    torch_item(self.loss_from_terms(self.terms(model, guide, *args, **kwargs)))
                    for _ in range(self.num_particles)
                )
                / self.num_particles
            )
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = 0.0
        for _ in range(self.num_particles):
            terms = self.terms(model, guide, *args, **kwargs)
            particle = self.loss_from_terms(terms)
            loss = particle if self.num_particles == 1 else loss + particle / self.num_particles
        self.last_terms = {name: Term(term.value.detach(), term.scale, term.plates) for name, term in terms.items()}
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss

    def terms(self, model, guide, *args, **kwargs) -> dict[str, Term]:
        model_trace, guide_trace = self.traces(model, guide, *args, **kwargs)
        terms = self.terms_from_traces(model_trace, guide_trace)
        if is_validation_enabled():
            model, guide = self.registered(model, guide)
            check_against_pyro(terms, model, guide, guide_trace, args, kwargs, self.max_plate_nesting)
        return terms

    def terms_from_traces(self, model_trace, guide_trace) -> dict[str, Term]:
        """Each sample site's term (see the class docstring); sites masked out entirely give none."""
        out = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            plates = tuple(f.name for f in site["cond_indep_stack"])
            if site["is_observed"]:
                mask, scale = site["mask"], site["scale"]
                if mask is False:
                    continue
                value = -log_prob(site)
            else:
                guide_site = guide_trace.nodes[name]
                mask, scale = guide_site["mask"], guide_site["scale"]
                if not guide_site["fn"].has_rsample and log_prob(guide_site).requires_grad:
                    raise ValueError(
                        f"guide site {name!r} is not reparameterizable but depends on parameters: its "
                        "gradient would be wrong (a discrete guide must have no parameters)"
                    )
                if mask is False:
                    continue
                try:
                    value = kl_divergence(guide_site["fn"], site["fn"])
                except NotImplementedError:  # no analytic KL: the Monte-Carlo term, as Pyro falls back to
                    value = log_prob(guide_site) - log_prob(site)
            out[name] = Term(scale_and_mask(value, 1.0, mask), scale, plates)
        for name, site in guide_trace.nodes.items():  # auxiliary guide sites: -entropy term
            if site["type"] == "sample" and name not in model_trace.nodes and not site_is_subsample(site):
                plates = tuple(f.name for f in site["cond_indep_stack"])
                if site["mask"] is not False:
                    out[name] = Term(scale_and_mask(log_prob(site), 1.0, site["mask"]), site["scale"], plates)
        return out

    def loss_from_terms(self, terms: dict[str, Term]) -> torch.Tensor:
        """``sum(value * scale)`` over the terms (a scale of 1 is not multiplied by: the same numbers, fewer
        operations for the backward pass to run)."""
        total = None
        for term in terms.values():
            unscaled = isinstance(term.scale, (int, float)) and term.scale == 1
            scaled = (term.value if unscaled else term.value * term.scale).sum()
            total = scaled if total is None else total + scaled
        return 0 if total is None else total


def log_prob(site) -> torch.Tensor:
    """The site's unscaled, unmasked log-probability: the one its trace computed, else computed once here."""
    if "unscaled_log_prob" not in site:
        site["unscaled_log_prob"] = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return site["unscaled_log_prob"]


def unwrap(error: BaseException) -> str:
    """The message of the error Pyro's trace re-raised (without the trace-shape tables it appends)."""
    while isinstance(error.__cause__, type(error)):
        error = error.__cause__
    return str(error).split("\nTrace Shapes:")[0].strip()


def check_against_pyro(terms, model, guide, guide_trace, args, kwargs, max_plate_nesting) -> None:
    """Raise AssertionError unless the terms sum to Pyro's own ``TraceMeanField_ELBO`` loss on the same draws.

    Pyro's loss is computed with both programs replayed on the guide trace's values, so it sees
    exactly the sample the terms were computed from.
    """
    replayed_guide = poutine.replay(guide, trace=guide_trace)
    # Pyro's validation refuses guide sites without rsample (its gradient would need a score function); a
    # parameter-free discrete guide needs none (refused above otherwise), and the loss value is the same
    with torch.no_grad(), pyro.validation_enabled(False):
        expected = TraceMeanField_ELBO(max_plate_nesting=max_plate_nesting).differentiable_loss(
            model, replayed_guide, *args, **kwargs
        )
        ours = sum((term.value * term.scale).sum() for term in terms.values())
    expected, ours = float(expected), float(ours)
    if not abs(ours - expected) <= 1e-5 * max(1.0, abs(expected)):
        raise AssertionError(
            f"TermwiseELBO: the terms sum to {ours!r}, Pyro's TraceMeanField_ELBO loss is {expected!r}"
        )


def simple_weights(w: torch.Tensor) -> torch.Tensor:
    """lambda_t = 1 / (T w_t), t = 1..T (index 0 unused), from a fixed variance's Eq. 12 weights w_t
    (length T + 1): the scale that turns the bound into L_simple."""
    T = w.shape[0] - 1
    weight = torch.zeros_like(w)
    weight[1:] = 1.0 / (T * w[1:])
    return weight.detach()  # a reweighting, not a path for gradients into a learned schedule


def objective(name: str, model):
    """``(program, weight)`` that SVI optimizes for the objective ``name``: what the model's class declares.

    ``name`` must be one of ``model.objectives``; the model's ``training_program(name)`` builds it.
    """
    supported = tuple(getattr(model, "objectives", ("elbo",)))  # the instance's (it may narrow its class's)
    if name not in supported:
        raise ValueError(f"{type(model).__name__} does not train on objective {name!r}; it supports {list(supported)}")
    return model.training_program(name)


def step_weight(objective_weight: torch.Tensor | None, proposal: torch.Tensor) -> torch.Tensor | None:
    """The per-timestep weights of one step: the objective's times the proposal's 1/(T p_t) (None: all 1)."""
    if objective_weight is None:
        return None if bool((proposal[1:] == 1).all()) else proposal
    return objective_weight * proposal.to(objective_weight)
