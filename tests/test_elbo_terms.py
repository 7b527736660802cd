"""TermwiseELBO's terms sum to Pyro's own TraceMeanField_ELBO loss, for every registered model and guide.

The pairs are read from the registry, so a newly registered program is covered without a line here.
Each pair is traced once (chain form and per-timestep form, every objective the model declares) and the
sum of the per-site terms is compared with ``TraceMeanField_ELBO().loss`` of the same programs replayed
on the same draws, with Pyro's validation on (Pyro's traces and checks) and off (only what the terms
read); the check TermwiseELBO runs under Pyro's validation is shown to fire on a mismatch. SVI steps with
the programs' networks registered once train the parameters that Pyro's own ``TraceMeanField_ELBO``
trains, registering them every step.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_ddpm import data, protocol
from pyro_ddpm.elbo import Term, TermwiseELBO, check_against_pyro, objective
from pyro_ddpm.optim import JointOptimizer
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


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "unvalidated"])
@pytest.mark.parametrize("model_name,guide_name", PAIRS)
def test_terms_sum_to_pyros_loss_for_every_registered_pair(model_name, guide_name, validate):
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
            with pyro.validation_enabled(validate):
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


def test_register_is_pyro_module_and_register_once_traces_its_parameters_the_first_time_only():
    net = torch.nn.Linear(2, 3)
    protocol.register("net", net)  # outside any handler: pyro.module
    store = pyro.get_param_store()
    assert sorted(store.keys()) == ["net$$$bias", "net$$$weight"]
    assert store["net$$$weight"] is net.weight

    once = protocol.RegisterOnce()

    def param_sites():
        trace = poutine.trace(once(lambda: protocol.register("net", net))).get_trace()
        return sorted(name for name, site in trace.nodes.items() if site["type"] == "param")

    assert param_sites() == ["net$$$bias", "net$$$weight"]
    assert param_sites() == []
    pyro.clear_param_store()  # the store no longer holds it: registered again
    assert param_sites() == ["net$$$bias", "net$$$weight"]
    assert store["net$$$bias"] is net.bias
    assert param_sites() == []
    other = torch.nn.Linear(2, 3)  # another module under the same name is registered
    trace = poutine.trace(once(lambda: protocol.register("net", other))).get_trace()
    assert sum(site["type"] == "param" for site in trace.nodes.values()) == 2


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "unvalidated"])
def test_svi_with_modules_registered_once_trains_as_pyro_registering_every_step(validate):
    """Three SVI steps of the trainer's kind (JointOptimizer: SGD, clipped) on the network and a learned
    schedule: TermwiseELBO(register_once=True) traces the parameters on the first step only and gives the
    parameters Pyro's own TraceMeanField_ELBO gives, which registers them at every step."""
    x0 = data.load("digits").test[:4]
    t = torch.tensor([[1], [3], [5], [6]])
    trained, sites = [], []
    for elbo in (TermwiseELBO(register_once=True), TraceMeanField_ELBO(max_plate_nesting=1)):
        pyro.clear_param_store()
        model, guide = _learned_pair()
        svi = SVI(
            model.per_timestep, guide.per_timestep, JointOptimizer(torch.optim.SGD, {"lr": 1e-2}, clip_norm=1.0), elbo
        )
        counts = []
        with pyro.validation_enabled(validate):
            for step in range(3):
                torch.manual_seed(1 + step)  # the guide's draws, the same for both ELBOs
                with poutine.trace(param_only=True) as captured:
                    svi.step(x0, t)
                counts.append(len(captured.trace.nodes))
        sites.append(counts)
        trained.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert sites == [[len(trained[0]), 0, 0], [len(trained[0])] * 3]  # the network's and the schedule's
    initial = dict(_learned_pair()[0].named_parameters())
    for name, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][name], rtol=1e-5, atol=1e-6)
    for part in ("eps.", "schedule."):  # both were trained
        assert any(not torch.equal(v, initial[n]) for n, v in trained[0].items() if n.startswith(part))


def _learned_pair():
    """The model and its learned-schedule guide (the model holds the guide's schedule), seeded."""
    torch.manual_seed(0)
    return _programs("ReverseProcess", "LearnedForwardProcess")
