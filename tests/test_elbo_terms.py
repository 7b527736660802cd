"""TermwiseELBO's terms sum to Pyro's own TraceMeanField_ELBO loss, for every registered model and guide.

The pairs are read from the registry, so a newly registered program is covered without a line here.
Each pair is traced once (chain form and per-timestep form, every objective the model declares) and the
sum of the per-site terms is compared with ``TraceMeanField_ELBO().loss`` of the same programs replayed
on the same draws; the check TermwiseELBO runs under Pyro's validation is shown to fire on a mismatch.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from pyro_ddpm import data, protocol
from pyro_ddpm.elbo import Term, TermwiseELBO, check_against_pyro, objective
from pyro_ddpm.registry import GUIDES, MODELS
from pyro_ddpm.train import TrainConfig, build

SPECS = {
    "ForwardProcess": "linear",
    "LinearForwardProcess": "linear",
    "CosineForwardProcess": "cosine",
    "LearnedForwardProcess": "learned",
    "UserBetasForwardProcess": "0.01,0.02,0.05,0.1,0.15,0.2",
    "MaskedForwardProcess": "linear",
    "UniformForwardProcess": "cosine",
}
PAIRS = [
    (m, g)
    for m in MODELS.names()
    if ":" not in m
    for g in GUIDES.names()
    if g in SPECS and MODELS.resolve(m).family == GUIDES.resolve(g).family
]


def test_every_registered_guide_has_a_spec_here():
    """A newly registered guide is paired (and so checked) only once it has a schedule spec above."""
    shipped = {g for g in GUIDES.names() if GUIDES.resolve(g).__module__.startswith("pyro_ddpm.")}
    assert shipped - {"LearnedTableForwardProcess"} <= set(SPECS)


def test_a_model_and_a_guide_of_different_families_are_refused_in_one_line():
    config = TrainConfig(data="digits", model="CategoricalReverseProcess", guide="ForwardProcess")
    with pytest.raises(ValueError, match="CategoricalReverseProcess reverses a categorical forward process") as e:
        config.check()
    assert "\n" not in str(e.value)


def _programs(model_name, guide_name):
    config = TrainConfig(
        data="digits",
        model=model_name,
        guide=guide_name,
        schedule=SPECS[guide_name],
        T=6,
        net_overrides={"ch": 8, "dropout": 0.0},
    )
    config.check()
    return build(config, data.load("digits"))


@pytest.mark.parametrize("model_name,guide_name", PAIRS)
def test_terms_sum_to_pyros_loss_for_every_registered_pair(model_name, guide_name):
    model, guide = _programs(model_name, guide_name)
    x0 = data.load("digits").test[:3]
    t = torch.tensor([[1, 4], [2, 6], [3, 5]])
    cases = [(model.chain, guide.chain, (x0,))]
    for name in model.objectives:
        program, weight = objective(name, model)
        cases.append((program.per_timestep, guide.per_timestep, (x0, t, weight)))
    for model_fn, guide_fn, args in cases:
        with torch.no_grad():
            guide_trace = poutine.trace(guide_fn).get_trace(*args)
            replayed = poutine.replay(guide_fn, trace=guide_trace)
            terms = TermwiseELBO().terms(model_fn, replayed, *args)
            ours = float(sum((term.value * term.scale).sum() for term in terms.values()))
            with pyro.validation_enabled(False):  # Pyro's check refuses a discrete guide site (no rsample)
                pyros = TraceMeanField_ELBO(max_plate_nesting=1).loss(model_fn, replayed, *args)
        assert ours == pytest.approx(pyros, rel=1e-6, abs=1e-6)
        pyro.clear_param_store()


def test_the_validation_check_fires_when_the_terms_disagree_with_pyro():
    model, guide = _programs("ReverseProcess", "ForwardProcess")
    x0 = data.load("digits").test[:2]
    t = torch.tensor([[2], [3]])
    guide_trace = poutine.trace(guide.per_timestep).get_trace(x0, t)
    replayed = poutine.replay(guide.per_timestep, trace=guide_trace)
    terms = TermwiseELBO().terms(model.per_timestep, replayed, x0, t)
    check_against_pyro(terms, model.per_timestep, replayed, guide_trace, (x0, t), {}, 1)  # agrees
    wrong = dict(terms, **{protocol.X_T: Term(terms[protocol.X_T].value + 1.0, 1.0, ())})
    with pytest.raises(AssertionError, match="TraceMeanField_ELBO loss"):
        check_against_pyro(wrong, model.per_timestep, replayed, guide_trace, (x0, t), {}, 1)


def test_a_latent_site_without_an_analytic_kl_falls_back_to_the_monte_carlo_term():
    """As TraceMeanField_ELBO does: log q - log p at the guide's draw when no KL is registered."""
    import pyro.distributions as dist

    def model():
        pyro.sample("z", dist.StudentT(3.0, 0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.5, 0.7))

    guide_trace = poutine.trace(guide).get_trace()
    replayed = poutine.replay(guide, trace=guide_trace)
    terms = TermwiseELBO(max_plate_nesting=0).terms(model, replayed)
    z = guide_trace.nodes["z"]["value"]
    expected = dist.Normal(0.5, 0.7).log_prob(z) - dist.StudentT(3.0, 0.0, 1.0).log_prob(z)
    torch.testing.assert_close(terms["z"].value, expected)
    assert float(terms["z"].value) == pytest.approx(TraceMeanField_ELBO(max_plate_nesting=0).loss(model, replayed))
