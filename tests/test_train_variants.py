"""Every variant program trains through the same trainer, resumes exactly and comes back from its checkpoint.

What is checked against independent computations: the rebuilt model's bound equals the bound of the
programs the trainer held at the end of training (same terms, same noise), the learned schedule's
parameters moved and were restored, importance-sampled runs resume bit for bit (sampler state
included), and the optimizer clips the global norm (the paper's rule), checked against a hand-computed
norm.
"""

import pytest
import torch

from pyro_ddpm import checkpoint, data
from pyro_ddpm.evaluate import bound_terms
from pyro_ddpm.train import TrainConfig, build, train

TINY = dict(
    data="digits", T=10, batch_size=16, net_overrides={"ch": 8}, warmup=2, lr=1e-3, log_every=2, checkpoint_every=3
)

VARIANTS = {
    "eps, elbo": {},
    "eps, simple, small variance": dict(objective="simple", variance="small"),
    "x0 prediction": dict(model="X0PredictionReverseProcess"),
    "v prediction": dict(model="VPredictionReverseProcess", objective="simple"),
    "learned variance, hybrid": dict(model="LearnedVarianceReverseProcess", objective="hybrid"),
    "learned variance, hybrid, importance-sampled": dict(
        model="LearnedVarianceReverseProcess", objective="hybrid", timesteps="importance"
    ),
    "cosine guide": dict(guide="CosineForwardProcess", schedule="cosine"),
    "learned schedule": dict(guide="LearnedForwardProcess", schedule="learned"),
    "importance-sampled timesteps": dict(timesteps="importance"),
    "binarized MNIST, Bernoulli decoder": dict(data="mnist5k-binary", net_overrides={"ch": 8}),
    "continuous swiss roll, Gaussian decoder": dict(data="swiss_roll-continuous", net_overrides={"hidden": 16}),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_variant_trains_and_its_checkpoint_rebuilds_the_same_programs(tmp_path, variant):
    config = TrainConfig(steps=4, **dict(TINY, **VARIANTS[variant]))
    state = checkpoint.load(train(config, tmp_path, progress=False))
    assert state.step == 4 and state.config["model"] == config.model and state.config["guide"] == config.guide
    assert state.programs["model"]["class"] == config.model and state.programs["guide"]["class"] == config.guide
    model, guide = checkpoint.build(state, use_ema=False)
    assert type(model).__name__ == config.model and type(guide).__name__ == config.guide
    assert model.schedule is guide.schedule  # one schedule object, learned or not

    # The same programs built fresh and given the stored weights give the same bound, term by term.
    dataset = data.load(config.data)
    fresh_model, fresh_guide = build(config, dataset)
    fresh_model.eps.load_state_dict(state.weights["net"])
    fresh_guide.load_state_dict(state.weights["guide"])
    x = dataset.test[:3]
    with torch.no_grad():
        a = bound_terms(model.eval(), guide, x, seed=1)
        b = bound_terms(fresh_model.eval(), fresh_guide, x, seed=1)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_learned_schedule_is_trained_by_the_same_svi_step_and_restored(tmp_path):
    config = TrainConfig(steps=3, guide="LearnedForwardProcess", schedule="learned", **TINY)
    initial = build(config, data.load("digits"))[1].state_dict()
    state = checkpoint.load(train(config, tmp_path, progress=False))
    stored = state.weights["guide"]
    moved = [k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], stored[k])]
    assert moved, f"no guide parameter changed among {list(initial)}"
    _, guide = checkpoint.build(state)
    for k, v in guide.state_dict().items():
        torch.testing.assert_close(v, stored[k], rtol=0, atol=0)


def test_importance_sampled_run_resumes_exactly(tmp_path):
    cfg = dict(TINY, timesteps="importance", checkpoint_every=2)
    straight = checkpoint.load(train(TrainConfig(steps=6, **cfg), tmp_path / "straight", progress=False))
    train(TrainConfig(steps=2, **cfg), tmp_path / "resumed", progress=False)
    resumed = checkpoint.load(train(TrainConfig(steps=6, **cfg), tmp_path / "resumed", progress=False, resume=True))
    a, b = straight.weights, resumed.weights
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert a["timesteps"].keys() == b["timesteps"].keys()
    assert all(torch.equal(a["timesteps"][k], b["timesteps"][k]) for k in a["timesteps"])
    assert any(v.abs().sum() > 0 for v in a["timesteps"].values() if v.is_floating_point())  # history was filled


def test_joint_optimizer_clips_the_global_norm():
    import pyro

    from pyro_ddpm.optim import JointOptimizer

    pyro.clear_param_store()
    a = pyro.param("a", torch.zeros(3))
    b = pyro.param("b", torch.zeros(2, 2))
    a_u, b_u = a.unconstrained(), b.unconstrained()
    a_u.grad = torch.tensor([3.0, 0.0, 4.0])
    b_u.grad = torch.full((2, 2), 6.0)  # global norm sqrt(9 + 16 + 4 * 36) = 13
    opt = JointOptimizer(torch.optim.SGD, {"lr": 1.0}, clip_norm=1.0)
    opt({a_u, b_u})
    torch.testing.assert_close(a_u.detach(), -torch.tensor([3.0, 0.0, 4.0]) / 13)
    torch.testing.assert_close(b_u.detach(), torch.full((2, 2), -6.0 / 13))
    assert a_u.grad is None and b_u.grad is None
    with pytest.raises(ValueError, match="clip_norm"):
        JointOptimizer(torch.optim.SGD, {"lr": 1.0}, clip_norm=0.0)


def test_bad_program_names_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'NoSuchModel'; choose one of \\['ReverseProcess'"):
        train(TrainConfig(model="NoSuchModel", **TINY), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train(TrainConfig(optimizer="Adamm", **TINY), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="ReverseProcess does not train on objective 'hybrid'"):
        train(TrainConfig(objective="hybrid", **TINY), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="has no variance 'small'; it implements \\['learned'\\]"):
        train(
            TrainConfig(model="LearnedVarianceReverseProcess", variance="small", **TINY), tmp_path / "d", progress=False
        )
    with pytest.raises(ValueError, match="unknown timestep sampler 'fancy'"):
        train(TrainConfig(timesteps="fancy", **TINY), tmp_path / "e", progress=False)
    assert not any(tmp_path.iterdir())


def test_cli_trains_evaluates_and_samples_a_variant_with_ddim(tmp_path, capsys):
    from pyro_ddpm.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--T",
                "10",
                "--ch",
                "8",
                "--batch-size",
                "8",
                "--steps",
                "2",
                "--model",
                "LearnedVarianceReverseProcess",
                "--objective",
                "elbo",
                "--guide",
                "LearnedForwardProcess",
                "--schedule",
                "learned",
                "--timesteps",
                "importance",
                "--optimizer",
                "AdamW",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    config = checkpoint.load(run).config
    assert (config["model"], config["guide"], config["optimizer"]) == (
        "LearnedVarianceReverseProcess",
        "LearnedForwardProcess",
        "AdamW",
    )
    assert main(["evaluate", str(run), "--limit", "4", "--no-figures", "--no-progress"]) == 0
    assert "total" in capsys.readouterr().out
    assert (
        main(
            [
                "sample",
                str(run),
                "--n",
                "4",
                "--sampler",
                "ddim",
                "--steps",
                "5",
                "--eta",
                "0.5",
                "--out",
                str(tmp_path / "ddim.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "ddim.png").stat().st_size > 100
    assert main(["sample", str(run), "--n", "4", "--sampler", "ddim", "--steps", "50"]) == 2  # S > T
    assert "steps" in capsys.readouterr().err


def test_cosine_decay_and_the_guide_learning_rate_scale():
    """lr_factor: a linear warm-up, then 0.5 (1 + cos(pi n / N)); the guide's parameters get lr * guide_lr_scale."""
    import math

    from pyro_ddpm.train import lr_factor, make_optimizer

    config = TrainConfig(steps=10, warmup=2, lr_decay="cosine", lr_decay_steps=10, lr=1.0)
    f = lr_factor(config)
    assert [f(0), f(1)] == pytest.approx([0.5 * 0.5 * (1 + math.cos(0.0)), 0.5 * (1 + math.cos(math.pi / 10))])
    assert f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)
    assert lr_factor(TrainConfig(steps=10, warmup=2))(7) == 1.0  # constant after the warm-up
    config = TrainConfig(
        data="digits",
        T=6,
        guide="LearnedTableForwardProcess",
        guide_lr_scale=0.1,
        lr=1e-2,
        warmup=2,
        net_overrides={"ch": 8},
    )
    config.check()
    model, guide = build(config, data.load("digits"))
    opt = make_optimizer(config, guide)
    import pyro

    pyro.clear_param_store()
    pyro.module("eps", model.eps)
    pyro.module("schedule", guide.schedule)
    params = {v.unconstrained() for v in pyro.get_param_store().values()}
    for p in params:
        p.grad = torch.ones_like(p)
    opt(params)
    rates = {id(p): g["lr"] for g in opt.optimizer.param_groups for p in g["params"]}
    assert [rates[id(p)] for p in guide.schedule.parameters()] == pytest.approx([1e-3 * 0.5] * 2)  # warm-up 1/2
    assert set(rates[id(p)] for p in model.eps.parameters()) == {1e-2 * 0.5}
