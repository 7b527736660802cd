"""The examples, each run once with ``--quick`` (in-process, through ``main(argv)``).

Numbers are checked against independent float64 references: the schedule constants of conftest's
``ref.constants`` for Eq. 12, scipy for the 2-D distances and the discretized Gaussian, closed-form
Gaussian KLs for the VAE's rate.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO
from scipy import stats

from pyro_ddpm import data

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    out = tmp_path_factory.mktemp("bound_is_weighted_eps_loss")
    result = load_example("bound_is_weighted_eps_loss").main(["--quick", "--out", str(out)])
    return out, result


@pytest.fixture(scope="module")
def swiss(tmp_path_factory):
    out = tmp_path_factory.mktemp("swiss_roll")
    result = load_example("swiss_roll").main(["--quick", "--out", str(out)])
    return out, result


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion_vs_vae")
    result = load_example("diffusion_vs_vae").main(["--quick", "--out", str(out)])
    return out, result


# --------------------------------------------------------------------------- bound_is_weighted_eps_loss
def test_traced_kl_is_w_t_times_eps_mse_plus_D_C_t(weighted, ref):
    out, returned = weighted
    assert_png(out / "weights.png")
    assert (out / "run" / "checkpoint.pt").is_file()
    r = json.loads((out / "identity.json").read_text())
    assert r["T"] == 10 and r["D"] == 64 and r["variance"] == "large" and r["dtype"] == "float64"
    c = ref.constants(np.asarray(r["betas"]))
    T, D = r["T"], r["D"]
    t = np.arange(2, T + 1)
    np.testing.assert_allclose(r["w"], c["w_large"][1:], rtol=1e-12)
    np.testing.assert_allclose(r["D_C"][1:], D * c["C_large"][2:], rtol=1e-12)
    kl, mse = np.asarray(r["kl"][1:], dtype=float), np.asarray(r["mse"][1:])
    assert r["kl"][0] is None  # t = 1 is the decoder's L_0, not a KL
    assert np.all(np.isfinite(kl)) and np.all(kl > 0) and np.all(mse > 0)
    np.testing.assert_allclose(kl, c["w_large"][t] * mse + D * c["C_large"][t], rtol=1e-6)
    assert r["max_rel_diff_per_image"] < 1e-6
    assert r["w_range"] == pytest.approx([c["w_large"][1:].min(), c["w_large"][1:].max()], rel=1e-12)
    assert 0 < r["bits_per_dim"] < 50 and r["L_T"] > 0 and r["L_0"] >= 0
    assert returned["kl"] == r["kl"]


def test_gradients_of_both_objectives_match_their_eps_mse_forms(weighted):
    out, _ = weighted
    g = json.loads((out / "identity.json").read_text())["gradients"]
    assert {"batch", "timesteps", "elbo", "simple", "cosine_elbo_simple", "parameters"} <= g.keys()
    assert len(g["timesteps"]) == g["batch"] == 64 and all(1 <= t <= 10 for t in g["timesteps"])
    assert g["elbo"]["vs_weighted_eps_mse_rel_diff"] < 1e-9
    assert g["simple"]["vs_algorithm1_rel_diff"] < 1e-9
    assert g["elbo"]["grad_norm"] > 0 and g["simple"]["grad_norm"] > 0
    assert -1.0 <= g["cosine_elbo_simple"] <= 1.0


# --------------------------------------------------------------------------- swiss_roll
def test_swiss_roll_writes_figures_and_sensible_metrics(swiss):
    out, _ = swiss
    for name in ("trajectories.png", "terms.png"):
        assert_png(out / name)
    r = json.loads((out / "swiss_roll.json").read_text())
    assert r["D"] == 2 and r["levels"] == 256 and "-1 + 2k/255" in r["grid"]
    assert set(r["objectives"]) == {"elbo", "simple"}
    floor = r["train_vs_test"]
    for name, m in r["objectives"].items():
        assert (out / name / "checkpoint.pt").is_file()
        assert m["likelihood"] == "DiscretizedGaussianLikelihood(levels=256)"  # a code length: bits/dim
        parts = m["L_T_bits_per_dim"] + m["rate_bits_per_dim"] + m["L_0_bits_per_dim"]
        assert m["bits_per_dim"] == pytest.approx(parts, rel=1e-9)
        assert 0 < m["bits_per_dim"] < 30 and m["se"] > 0 and m["L_T_bits_per_dim"] > 0
        for d in ("energy_distance", "sliced_wasserstein"):
            assert math.isfinite(m[d]) and m[d] > floor[d] > 0  # a few steps cannot beat held-out data


def test_energy_distance_is_scipys_in_one_dimension_and_invariant_to_rotation():
    ex = load_example("swiss_roll")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(0.5, 1.3, size=200)
    flat = lambda v: np.stack([v, np.zeros_like(v)], axis=1)  # noqa: E731
    assert ex.energy_distance(flat(a), flat(b)) == pytest.approx(stats.energy_distance(a, b), rel=1e-10)
    A, B = rng.normal(size=(150, 2)), rng.normal(size=(120, 2)) + [0.7, -0.2]
    rot = np.array([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]])
    assert ex.energy_distance(A @ rot.T, B @ rot.T) == pytest.approx(ex.energy_distance(A, B), rel=1e-10)
    assert ex.energy_distance(A, A) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="point sets"):
        ex.energy_distance(A, np.zeros((3, 3)))


@pytest.mark.parametrize("shift", [(0.5, 0.0), (0.3, -0.4), (0.0, 2.0)])
def test_sliced_wasserstein_of_a_shifted_cloud_is_the_mean_projected_shift(shift):
    """Projections of a translate differ by v.u, so W1 = |v.u| and SW1 -> |v| E|cos| = 2|v|/pi."""
    ex = load_example("swiss_roll")
    a = np.random.default_rng(1).normal(size=(200, 2))
    v = np.asarray(shift)
    assert ex.sliced_wasserstein(a, a + v, directions=360) == pytest.approx(2 * np.linalg.norm(v) / math.pi, rel=1e-4)
    with pytest.raises(ValueError, match="directions"):
        ex.sliced_wasserstein(a, a, directions=0)


# --------------------------------------------------------------------------- diffusion_vs_vae
def test_diffusion_vs_vae_reports_both_bounds_in_bits_per_dim(vae_run):
    out, _ = vae_run
    assert_png(out / "bounds.png")
    r = json.loads((out / "diffusion_vs_vae.json").read_text())
    d, v = r["ddpm"], r["vae"]
    assert r["D"] == 64 and r["levels"] == 17 and r["test_images"] == 16
    assert d["bits_per_dim"] == pytest.approx(d["rate_bits_per_dim"] + d["distortion_bits_per_dim"], rel=1e-9)
    assert v["elbo_bits_per_dim"] == pytest.approx(v["rate_bits_per_dim"] + v["distortion_bits_per_dim"], rel=1e-9)
    for x in (d["bits_per_dim"], v["elbo_bits_per_dim"], v["iwae_bits_per_dim"], v["rate_bits_per_dim"]):
        assert math.isfinite(x) and x > 0
    # the importance-weighted bound is tighter than the ELBO (up to Monte-Carlo error)
    assert v["iwae_bits_per_dim"] <= v["elbo_bits_per_dim"] + 2 * v["elbo_se"]
    small_t = [k for k in d if k.startswith("L_0_to_L_")]
    assert small_t == ["L_0_to_L_8_bits_per_dim"] and 0 < d[small_t[0]] < d["bits_per_dim"]
    assert d["latent_sites"] == [f"x_{s}" for s in range(10, 0, -1)] and v["latent_sites"] == ["z"]
    assert "DiscretizedGaussianLikelihood(levels=17)" in (d["likelihood"], v["likelihood"])
    assert v["likelihood"] == "DiscretizedGaussianLikelihood(levels=17)"


def test_vae_terms_are_the_closed_form_kl_and_the_discretized_gaussian(ref):
    """The VAE's traced terms: rate = KL(N(m, s^2) || N(0, 1)) summed, distortion = -log of Eq. 13's bin masses."""
    from pyro_ddpm import data
    from pyro_ddpm.elbo import TermwiseELBO
    from pyro_ddpm.vae import VAE

    torch.manual_seed(0)
    vae = VAE((1, 8, 8), 17, z_dim=3, hidden=8)
    x0 = data.load("digits").test[:5]
    model_trace, guide_trace = TermwiseELBO().traces(vae.model, vae.guide, x0)
    terms = TermwiseELBO().terms_from_traces(model_trace, guide_trace)
    with torch.no_grad():
        m, s = (u.double().numpy() for u in vae.encoder(x0))
        z = guide_trace.nodes["z"]["value"]
        loc, scale = (u.double().numpy() for u in vae.decoder(z))
    kl = ref.kl_normal(m, s**2, 0.0, 1.0).sum(-1)
    np.testing.assert_allclose(terms["z"].value.detach().double().numpy(), kl, rtol=1e-5)
    nll = -ref.disc_log_prob(x0.double().numpy(), loc, scale, 17).reshape(5, -1).sum(-1)
    np.testing.assert_allclose(terms["x_0"].value.detach().double().numpy(), nll, rtol=1e-5)


def test_diffusion_vs_vae_refuses_a_ddpm_trained_on_other_data(swiss, tmp_path):
    swiss_out, _ = swiss
    with pytest.raises(
        ValueError, match=r"digits has images of shape \(1, 8, 8\), the checkpoint was trained on shape \(2,\)"
    ):
        load_example("diffusion_vs_vae").main(
            ["--quick", "--ddpm-checkpoint", str(swiss_out / "elbo"), "--out", str(tmp_path)]
        )


@pytest.mark.parametrize(
    "name, argv, match",
    [
        ("bound_is_weighted_eps_loss", ["--steps", "0"], "--steps must be positive"),
        ("bound_is_weighted_eps_loss", ["--T", "1"], "--T must be at least 2"),
        ("swiss_roll", ["--directions", "0"], "--directions must be positive"),
        ("diffusion_vs_vae", ["--particles", "0"], "--particles must be positive"),
        ("pixelcnn_reference", ["--steps", "0"], "--steps must be positive"),
        ("pixelcnn_reference", ["--dropout", "1"], r"--dropout must lie in \[0, 1\)"),
        ("pixelcnn_reference", ["--held-out", "1437"], "--held-out 1437 leaves no training images of 1437"),
        ("pixelcnn_reference", ["--data", "swiss_roll"], "needs single-channel grid images, swiss_roll"),
    ],
)
def test_bad_arguments_raise_one_clear_error(name, argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_example(name).main(argv + ["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- pixelcnn_reference
def test_pixelcnn_logits_at_a_pixel_depend_only_on_the_pixels_before_it():
    """d logits_i / d x_j = 0 for every j at or after i in raster order; the nearest earlier pixels count."""
    pc = load_example("pixelcnn_reference")
    torch.manual_seed(0)
    net = pc.PixelCNN(17, 8, 8, channels=6, layers=2, dropout=0.0)
    net.head[-1].weight.data.normal_()  # a random read-out, so every logit depends on what its layers see
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    jac = torch.autograd.functional.jacobian(lambda u: net(u).sum(1), x).reshape(64, 64)  # [i, j]
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    assert torch.all(jac[torch.from_numpy(j >= i)] == 0)
    left = [r * 8 + c for r in range(8) for c in range(1, 8)]
    assert torch.all(jac[left, [i - 1 for i in left]] != 0)  # a pixel sees its left neighbour
    assert torch.all(jac[8:, :56].diagonal() != 0)  # and the one above it


def test_pixelcnn_trace_log_prob_is_the_categorical_log_pmf_of_its_logits():
    """log p(x_0) read off the Pyro trace equals a float64 log-softmax picked at each pixel's level."""
    pc = load_example("pixelcnn_reference")
    torch.manual_seed(1)
    net = pc.PixelCNN(17, 8, 8, channels=4, layers=1, dropout=0.3)
    net.head[-1].weight.data.normal_()
    x0 = data.load("digits").test[:6]
    logits = net.eval()(x0).detach().double().numpy()  # (B, K, H, W)
    k = np.rint((x0.double().numpy()[:, 0] + 1) * 8).astype(int)  # the level index of -1 + 2k/16
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = np.take_along_axis(log_softmax, k[:, None], axis=1)[:, 0].reshape(6, -1).sum(1)
    ref_model = pc.PixelCNNReference(net.train(), 17)
    np.testing.assert_allclose(ref_model.log_prob(x0).double().numpy(), want, rtol=1e-5)
    assert net.training  # scoring left the network in the mode it found it in
    net.eval()
    with torch.no_grad():  # the model's ELBO loss with the empty guide is -log p(x_0)
        loss = Trace_ELBO().loss(ref_model.model, ref_model.guide, x0)
    np.testing.assert_allclose(loss, -want.sum(), rtol=1e-5)


def test_an_untrained_pixelcnn_codes_every_pixel_in_log2_k_bits():
    """The network's read-out starts where PyTorch puts it; with it zeroed every level is equally likely:
    exactly log2(17) bits per pixel, whatever the image."""
    pc = load_example("pixelcnn_reference")
    net = pc.PixelCNN(17, 8, 8, channels=4, layers=1, dropout=0.0)
    net.head[-1].weight.data.zero_()
    net.head[-1].bias.data.zero_()
    log_p = pc.PixelCNNReference(net, 17).log_prob(data.load("digits").test)
    mean, se = pc.bits_per_dim(log_p, 64)
    assert mean == pytest.approx(math.log2(17), rel=1e-6) and se == pytest.approx(0.0, abs=1e-6)


def test_pixelcnn_reference_scores_the_test_split_with_the_weights_the_held_out_images_chose(tmp_path):
    result = load_example("pixelcnn_reference").main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "pixelcnn_reference.json").read_text())
    assert written == json.loads(json.dumps(result))
    held = [c["held_out_bits_per_dim"] for c in written["curve"]]
    assert [c["step"] for c in written["curve"]] == [10, 20]
    assert written["held_out_bits_per_dim"] == min(held)
    assert written["best_step"] == written["curve"][held.index(min(held))]["step"]
    assert (written["train_images"], written["held_out_images"], written["test_images"]) == (1237, 200, 360)
    assert 0 < written["test_bits_per_dim"] < 2 * math.log2(17) and written["test_se"] > 0
