"""The evaluator: traced terms equal the chain's, chunking does not matter, variants plug in."""

import json
import math
import re

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from pyro_ddpm import data
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.evaluate import bound, bound_of_network, bound_terms, summarize
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import (
    DiscretizedGaussianLikelihood,
    TanhDiscretizedGaussian,
    TanhDiscretizedGaussianLikelihood,
)
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import MLP, build_network
from pyro_ddpm.presets import NETWORKS
from pyro_ddpm.schedule import Schedule

pytestmark = pytest.mark.usefixtures("float64")

K = 17


def clipped(eps, schedule, variance, likelihood):
    """The eps model with its x_0 prediction clipped (``clip_denoised``): an operation, not a class."""
    return ReverseProcess(eps, schedule, variance, likelihood).with_clipping()


def make(schedule, variance="large", model_class=ReverseProcess, likelihood=None, dim=3, seed=0):
    torch.manual_seed(seed)
    net = MLP(dim=dim, hidden=16)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model = model_class(net, schedule, variance, likelihood or DiscretizedGaussianLikelihood(K))
    return model, ForwardProcess(schedule)


def grid_data(n, dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (n, dim), generator=g).double() * 2 / (K - 1) - 1


SCHEDULES = {
    "linear": lambda: Schedule.linear(6, 0.05, 0.4),
    "cosine": lambda: Schedule.cosine(7),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("variance", ["large", "small"])
@pytest.mark.parametrize("model_class", [ReverseProcess, clipped])
def test_terms_equal_the_chain_forms_traced_kls_for_the_same_noise(schedule, variance, model_class):
    schedule = SCHEDULES[schedule]()
    T = schedule.T
    model, guide = make(schedule, variance, model_class)
    x0 = grid_data(4)
    guide_trace = poutine.trace(guide.chain).get_trace(x0)
    chain_terms = TermwiseELBO().terms(model.chain, poutine.replay(guide.chain, trace=guide_trace), x0)
    # the chain's x_t, t = 1..T, as the evaluator's standard-normal noise
    abar = np.cumprod(1 - schedule.betas.numpy())
    noise = torch.stack(
        [
            (guide_trace.nodes[f"x_{t}"]["value"] - math.sqrt(abar[t - 1]) * x0) / math.sqrt(1 - abar[t - 1])
            for t in range(1, T + 1)
        ],
        dim=1,
    )[None]
    L = torch.as_tensor(bound(model, guide, x0, noise=noise).bound["L"].values[0])
    for s in range(T + 1):
        torch.testing.assert_close(L[:, s], chain_terms[f"x_{s}"].value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("max_batch", [1, 4, 7, 1000])
def test_chunking_does_not_change_the_result(max_batch):
    schedule = Schedule.linear(6, 0.05, 0.4)
    model, guide = make(schedule)
    x0 = grid_data(5)
    reference = bound(model, guide, x0, draws=2, max_batch=6 * 5, seed=3).bound
    chunked = bound(model, guide, x0, draws=2, max_batch=max_batch, seed=3).bound
    for name in ("L", "sq_error"):
        np.testing.assert_allclose(chunked[name].values, reference[name].values, rtol=1e-12, atol=1e-12)
    # and a subset of images keeps its own noise, identified by image id
    subset = bound(model, guide, x0[2:4], draws=2, seed=3, image_ids=[2, 3]).bound
    np.testing.assert_allclose(subset["L"].values, reference["L"].values[:, 2:4], rtol=1e-12)


def test_draws_are_independent_and_summarized_with_noise_errors():
    schedule = Schedule.linear(6, 0.05, 0.4)
    model, guide = make(schedule)
    idata = bound(model, guide, grid_data(8), draws=3)
    L = idata.bound["L"].values
    assert not np.allclose(L[0, :, 1:-1], L[1, :, 1:-1])  # the rate terms depend on the noise
    np.testing.assert_allclose(L[0, :, -1], L[1, :, -1])  # L_T is analytic given x_0
    summary = summarize(idata)
    assert summary["draws"] == 3 and 0 < summary["total"]["se_noise"] < 10 * summary["total"]["se"]
    D = 3
    total = L.sum(-1).mean() / (D * math.log(2))
    assert summary["total"]["bits_per_dim"] == pytest.approx(total, rel=1e-12)
    parts = sum(summary[k]["bits_per_dim"] for k in ("prior_L_T", "rate_L_1_to_L_T-1", "distortion_L_0"))
    assert summary["total"]["bits_per_dim"] == pytest.approx(parts, rel=1e-12)
    coding = {r["step"]: r for r in summary["progressive_coding"]}
    L_mean = L.mean((0, 1)) / (D * math.log(2))
    assert coding[6]["rate_bits_per_dim"] == pytest.approx(L_mean[6], rel=1e-12)  # only L_T received
    assert coding[1]["rate_bits_per_dim"] == pytest.approx(L_mean[1:].sum(), rel=1e-12)
    mse = idata.bound["sq_error"].values.mean((0, 1))
    assert coding[1]["distortion_rmse"] == pytest.approx(math.sqrt(mse[0]), rel=1e-12)
    np.testing.assert_allclose(bound_terms(model, guide, grid_data(8), draws=3).numpy(), L.mean(0), rtol=1e-12)


def test_x0_prediction_read_from_the_trace_is_eq15():
    """sq_error uses x0_hat recovered from the traced mean; compare with Eq. 15 from eps_theta directly."""
    schedule = Schedule.linear(5, 0.05, 0.4)
    model, guide = make(schedule)
    x0 = grid_data(3)
    abar = np.cumprod(1 - schedule.betas.numpy())
    noise = torch.randn(1, 3, 5, 3)
    sq = bound(model, guide, x0, noise=noise).bound["sq_error"].values[0]
    for t in range(1, 6):
        x_t = math.sqrt(abar[t - 1]) * x0 + math.sqrt(1 - abar[t - 1]) * noise[0, :, t - 1]
        eps = model.eps(x_t, torch.full((3,), t))
        x0_hat = (x_t - math.sqrt(1 - abar[t - 1]) * eps) / math.sqrt(abar[t - 1])
        expected = (((x0_hat - x0) * 127.5) ** 2).mean(-1)
        np.testing.assert_allclose(sq[:, t - 1], expected.detach().numpy(), rtol=1e-8)


def test_clipped_mean_is_eq11_inside_the_box_and_posterior_mean_of_the_clip_outside():
    schedule = Schedule.linear(6, 0.05, 0.4)
    model, _ = make(schedule)
    clipped_model = clipped(model.eps, schedule, "large", model.likelihood)
    abar = np.cumprod(1 - schedule.betas.numpy())
    beta = schedule.betas.numpy()
    x_t = torch.randn(200, 3) * 2
    for t in range(1, 7):
        tt = torch.full((200,), t)
        eps = model.eps(x_t, tt).detach()
        x0_hat = (x_t - math.sqrt(1 - abar[t - 1]) * eps) / math.sqrt(abar[t - 1])
        abar_prev = abar[t - 2] if t > 1 else 1.0
        c0 = math.sqrt(abar_prev) * beta[t - 1] / (1 - abar[t - 1])
        ct = math.sqrt(1 - beta[t - 1]) * (1 - abar_prev) / (1 - abar[t - 1])
        expected = c0 * x0_hat.clamp(-1, 1) + ct * x_t
        torch.testing.assert_close(clipped_model.transition(x_t, tt)[0], expected, rtol=1e-10, atol=1e-10)
        inside = (x0_hat.abs() <= 1).all(-1)
        torch.testing.assert_close(model.transition(x_t, tt)[0][inside], expected[inside], rtol=1e-10, atol=1e-10)
    assert not torch.equal(model.transition(x_t, tt)[0], clipped_model.transition(x_t, tt)[0])


def official_tanh_log_prob(x, loc, scale, levels):
    """The official code's discretized_gaussian_log_likelihood, generalized to K levels (numpy)."""

    def cdf(z):
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))

    h = 1.0 / (levels - 1)
    cdf_plus, cdf_min = cdf((x - loc + h) / scale), cdf((x - loc - h) / scale)
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_1m_cdf_min = np.log(np.maximum(1 - cdf_min, 1e-12))
    log_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_1m_cdf_min, log_delta))


@pytest.mark.parametrize("levels", [17, 256])
def test_tanh_decoder_is_the_official_formula(levels):
    g = np.random.default_rng(0)
    x = -1 + 2 * g.integers(0, levels, 500) / (levels - 1)
    loc, scale = g.uniform(-1.2, 1.2, 500), g.uniform(1e-3, 0.5, 500)
    got = TanhDiscretizedGaussian(torch.tensor(loc), torch.tensor(scale), levels).log_prob(torch.tensor(x))
    # the formula subtracts nearby CDF values: ulp differences between numpy's and torch's tanh are
    # amplified in the tails, so compare probabilities (absolute) and log-probabilities where not tiny
    expected = official_tanh_log_prob(x, loc, scale, levels)
    np.testing.assert_allclose(np.exp(got.numpy()), np.exp(expected), rtol=1e-8, atol=1e-14)
    body = expected > -18
    np.testing.assert_allclose(got.numpy()[body], expected[body], rtol=1e-8)


def test_variants_are_evaluated_without_new_code():
    """A second schedule, the other variance, the clipped mean and the tanh decoder all go through bound()."""
    x0 = grid_data(6)
    results = {}
    for name, (schedule, variance, cls, lik) in {
        "linear-large": (Schedule.linear(6, 0.05, 0.4), "large", ReverseProcess, None),
        "cosine-small": (Schedule.cosine(8), "small", ReverseProcess, None),
        "clipped": (Schedule.linear(6, 0.05, 0.4), "large", clipped, None),
        "tanh": (Schedule.linear(6, 0.05, 0.4), "large", ReverseProcess, TanhDiscretizedGaussianLikelihood(K)),
    }.items():
        model, guide = make(schedule, variance, cls, lik)
        idata = bound(model, guide, x0, seed=1)
        assert idata.bound["L"].shape == (1, 6, schedule.T + 1)
        assert np.isfinite(idata.bound["L"].values).all()
        results[name] = summarize(idata)["total"]["bits_per_dim"]
    # same network and noise: the tanh CDF moves the bound a little, and only through L_0
    assert results["tanh"] != results["linear-large"]
    assert results["tanh"] == pytest.approx(results["linear-large"], rel=0.05)
    assert pyro.get_param_store() is not None


def test_bare_network_entry_point_is_the_same_evaluation():
    schedule = Schedule.linear(6, 0.05, 0.4)
    model, guide = make(schedule, "small")
    x0 = grid_data(4)
    a = bound(model, guide, x0, seed=2).bound["L"].values
    b = bound_of_network(model.eps, schedule, model.likelihood, x0, variance="small", seed=2).bound["L"].values
    np.testing.assert_array_equal(a, b)


def test_a_plain_callable_runs_in_the_images_dtype():
    """A parameterless network (a plain function around a float64 convolution) is fed float64 images as given."""
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    seen = []

    def fn(x, t):
        seen.append(x.dtype)
        return conv(x)

    x0 = data.load("digits").test[:2].double()
    L = bound_of_network(fn, Schedule.linear(6), DiscretizedGaussianLikelihood(17), x0).bound["L"].values
    assert set(seen) == {torch.float64} and np.isfinite(L).all()


def test_a_guide_with_non_finite_weights_is_named_in_one_line():
    schedule = Schedule.linear(6)
    net = build_network(dict(NETWORKS["digits"], ch=8)).double()
    model = ReverseProcess(net, schedule, "large", DiscretizedGaussianLikelihood(17), shape=(1, 8, 8))
    guide = ForwardProcess(Schedule.linear(6), event_dim=3)
    guide.schedule.beta.fill_(float("nan"))
    with pytest.raises(
        ValueError, match=r"the guide's weights are not finite \(\d+ tensors, e.g. schedule.beta\)"
    ) as e:
        bound(model, guide, data.load("digits").test[:2].double())
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- evaluating a run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pyro_ddpm.cli import main

    out = tmp_path_factory.mktemp("evaluate_run") / "digits"
    argv = ["train", "--data", "digits", "--steps", "4", "--T", "10", "--ch", "8", "--batch-size", "16"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def digits_run(trained, float64):
    """A short digits run, evaluated as the command does: with torch's default dtype float32 (a checkpoint's
    network is built in the default dtype, the data sets are float32)."""
    torch.set_default_dtype(torch.float32)
    return trained


def test_evaluate_run_writes_the_bound_and_estimates_of_the_same_images(digits_run, tmp_path):
    from pyro_ddpm import checkpoint
    from pyro_ddpm.evaluate import Evaluation, evaluate_run
    from pyro_ddpm.importance_weighted import importance_weighted
    from pyro_ddpm.ode import ode_likelihood

    out = tmp_path / "ev"
    options = Evaluation(limit=5, seed=2, ode=True, ode_steps=4, particles=2, out=str(out), progress=False)
    report = evaluate_run(digits_run, options)
    # the same images and noise, by the library's pieces; the bound's total and s.e. from L by hand
    model, guide = checkpoint.load(digits_run).build()
    x = data.load("digits").test[:5]
    L = bound(model, guide, x, seed=2).bound["L"].values[0]  # (images, T + 1), nats
    per_image = L.sum(1) / (64 * math.log(2))
    total = report.summary["total"]
    assert total["bits_per_dim"] == pytest.approx(per_image.mean(), rel=1e-12)
    assert total["se"] == pytest.approx(per_image.std(ddof=1) / math.sqrt(5), rel=1e-10)
    assert total["nats_per_image"] == pytest.approx(L.sum(1).mean(), rel=1e-12)
    ode = report.estimates["probability-flow ODE"]
    iw = report.estimates["importance-weighted, K = 2"]
    assert ode["bits_per_dim"] == pytest.approx(ode_likelihood(model, x, steps=4, seed=2)["bits_per_dim"], rel=1e-12)
    want_iw = importance_weighted(model, guide, x, particles=2, seed=2)
    assert iw["bits_per_dim"] == pytest.approx(want_iw["bits_per_dim"], rel=1e-12)
    # what it says it wrote is what is there, the summary as JSON
    written = {p.name for p in out.iterdir()}
    assert (
        written
        == {p.name for p in report.paths.values()}
        == {
            "bound_test.nc",
            "bound_test.json",
            "ode_test.json",
            "iw_test.json",
            "bound_test_terms.png",
            "bound_test_rate_distortion.png",
            "bound_test_strip.png",
        }
    )
    stored = json.loads((out / "bound_test.json").read_text())
    assert stored["total"]["bits_per_dim"] == total["bits_per_dim"] and stored["step"] == 4
    assert json.loads((out / "iw_test.json").read_text())["nats"] == pytest.approx(list(iw["nats"]), rel=1e-15)


def test_format_report_prints_what_was_evaluated_the_table_and_the_files(digits_run, tmp_path):
    from pyro_ddpm.evaluate import Evaluation, evaluate_run, format_report

    out = tmp_path / "ev"
    options = Evaluation(limit=3, particles=2, draws=2, figures=False, split="train", out=str(out), progress=False)
    report = evaluate_run(digits_run, options)
    lines = format_report(report).splitlines()
    assert lines[0] == (
        "digits train split, ReverseProcess, objective elbo, step 4; "
        "decoder DiscretizedGaussianLikelihood(levels=17), clip_denoised=False"
    )
    assert lines[1].split() == ["term", "bits/dim", "+-", "s.e.", "(noise)", "nats/image", "+-", "s.e."]
    L = report.idata.bound["L"].values  # (draws, images, T + 1)
    per_image = L.sum(-1).mean(0) / (64 * math.log(2))
    assert lines[2].split()[:3] == ["total", f"{per_image.mean():.5f}", f"{per_image.std(ddof=1) / math.sqrt(3):.5f}"]
    assert "(3 images x 2 noise draw(s), D = 64, T = 10)" in lines
    iw = report.estimates["importance-weighted, K = 2"]
    assert re.fullmatch(
        rf"importance-weighted, K = 2 +{iw['bits_per_dim']:.5f} +{iw['se']:.5f} bits/dim  \(\d+\.\d s\)",
        lines[lines.index("other estimators on the same images (mean, s.e. over images):") + 1],
    )
    assert lines[-1] == f"written: {out / 'bound_train.nc'}, {out / 'bound_train.json'}, {out / 'iw_train.json'}"
    assert sorted(p.name for p in out.iterdir()) == ["bound_train.json", "bound_train.nc", "iw_train.json"]


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"limit": 0}, "--limit must be a positive number of images, got 0"),
        ({"max_batch": 0}, "--max-batch must be a positive integer, got 0"),
        ({"draws": -1}, "--draws must be a positive integer, got -1"),
        ({"particles": 0}, "--particles must be a positive integer, got 0"),
        ({"ode_steps": 0}, "--ode-steps must be a positive integer, got 0"),
        ({"divergence": "hutch"}, "unknown --divergence 'hutch'; choose one of"),
        ({"split": "valid"}, "unknown --split 'valid'; choose one of \\['train', 'test'\\]"),
        ({"T": 20}, "schedule mismatch: the checkpoint has T = 10, --T asked 20"),
        ({"data": "swiss_roll"}, "shape \\(2,\\), the checkpoint was trained on shape \\(1, 8, 8\\)"),
        ({"diffusers": "somewhere"}, "give a run directory \\(or checkpoint\\) or --diffusers DIR, not both"),
    ],
)
def test_bad_options_are_one_error_before_anything_is_written(digits_run, tmp_path, settings, message):
    from pyro_ddpm.evaluate import Evaluation, evaluate_run

    with pytest.raises(ValueError, match=message):
        evaluate_run(digits_run, Evaluation(out=str(tmp_path / "ev"), progress=False, **settings))
    assert not (tmp_path / "ev").exists()


def test_neither_a_run_nor_a_pipeline_is_refused():
    from pyro_ddpm.evaluate import Evaluation, evaluate_run

    with pytest.raises(ValueError, match="give a run directory"):
        evaluate_run(None, Evaluation())
    with pytest.raises(ValueError, match="--data"):
        evaluate_run(None, Evaluation(diffusers="somewhere"))


def test_the_command_line_flags_are_the_fields():
    """The flags generated from Evaluation: names, switches, choices and defaults as the command has them."""
    import argparse

    from pyro_ddpm import options
    from pyro_ddpm.evaluate import Evaluation

    parser = argparse.ArgumentParser()
    options.add_arguments(parser, Evaluation)
    argv = ["--no-figures", "--no-progress", "--clip-denoised", "--ode", "--ode-steps", "7", "--T", "10"]
    argv += ["--max-batch", "64", "--split", "train", "--divergence", "exact", "--diffusers", "pipe", "--seed", "5"]
    given = options.given(parser.parse_args(argv), Evaluation)
    assert Evaluation(**given) == Evaluation(
        figures=False,
        progress=False,
        clip_denoised=True,
        ode=True,
        ode_steps=7,
        T=10,
        max_batch=64,
        split="train",
        divergence="exact",
        diffusers="pipe",
        seed=5,
    )
    assert options.given(parser.parse_args([]), Evaluation) == {}
    text = " ".join(parser.format_help().split())
    assert "--diffusers DIR" in text and "--ode-method ODE_METHOD" in text and "(default 1024)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--split", "valid"])
