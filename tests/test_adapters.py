"""Adapters: plain callables, zero-based networks, diffusers UNets and pipelines, improved-diffusion nets.

The plain-callable bound is checked against closed-form expectations (numpy): for an eps-predictor
affine in x_t, eps(x_t, t) = g_t (x_t - sqrt(abar_t) m) with any g_t, every term of Eq. 5 given x_0 is a Gaussian
expectation. With x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) e,

    L_T     = sum_d KL(N(sqrt(abar_T) x_0, 1 - abar_T) || N(0, 1))
    L_{t-1} = sum_d [ (log(s2_t / bt_t) + bt_t / s2_t - 1) / 2 + E (mu_tilde - mu_theta)^2 / (2 s2_t) ]
    L_0     = sum_d [ log(2 pi s2_1) / 2 + E (x_0 - mu_theta(x_1, 1))^2 / (2 s2_1) ]   (Gaussian decoder)

with mu_theta = u_t x_t + v_t, u_t = (1 - e_t g_t) / sqrt(alpha_t), v_t = e_t g_t sqrt(abar_t) m / sqrt(alpha_t),
e_t = beta_t / sqrt(1 - abar_t), so mu_tilde - mu_theta = A x_0 + B e + C is Gaussian in e.

The diffusers checks compare the adapter with the same network wrapped by hand in the library's
native path (``unet(x, t - 1).sample`` in a two-line module) to round-off, and show that the shifted
convention ``unet(x, t)`` gives a different bound, so the convention is pinned.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pyro_ddpm import adapters, evaluate
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood, check_images
from pyro_ddpm.models import LearnedVarianceReverseProcess, ReverseProcess
from pyro_ddpm.schedule import Schedule

M, S, D, T = 0.1, 0.3, 2, 10
BETAS = np.linspace(0.01, 0.3, T)
ABAR = np.concatenate([[1.0], np.cumprod(1 - BETAS)])


# g_t: the optimal predictor's for N(m, s^2) data, times 1 +- 1/2 alternating in t (any g_t will do).
G = np.array(
    [np.nan]
    + [math.sqrt(1 - ABAR[t]) / (ABAR[t] * S**2 + 1 - ABAR[t]) * (1 + 0.5 * (-1) ** t) for t in range(1, T + 2 - 1)]
    + [np.nan]
)


def g_of(t):
    return G[t]


def eps_zero_based(x, i):
    """A plain function (not a Module) with the zero-based convention: timestep i means the library's t = i + 1."""
    t = (i + 1).clamp(max=T)  # clamp so that the wrong convention still runs (and gives a wrong bound)
    a = torch.as_tensor(ABAR)[t].to(x)[:, None]
    return torch.as_tensor(G)[t].to(x)[:, None] * (x - a.sqrt() * M)


def closed_form_terms(x0, variance="large"):
    """E over the noise of L_0..L_T given x_0 (module docstring), per image: (N, T + 1)."""
    beta = np.concatenate([[np.nan], BETAS])
    alpha = 1 - beta
    bt = np.concatenate([[np.nan], (1 - ABAR[:-1]) / (1 - ABAR[1:]) * BETAS])
    s2 = {t: bt[2] if t == 1 else (beta[t] if variance == "large" else bt[t]) for t in range(1, T + 1)}
    out = np.zeros((x0.shape[0], T + 1))
    aT = ABAR[T]
    out[:, T] = (0.5 * ((1 - aT) + aT * x0**2 - 1 - math.log(1 - aT))).sum(1)
    for t in range(1, T + 1):
        a, b = math.sqrt(ABAR[t]), math.sqrt(1 - ABAR[t])
        e, r = beta[t] / b, 1 / math.sqrt(alpha[t])
        u, v = r * (1 - e * g_of(t)), r * e * g_of(t) * a * M
        if t == 1:  # x_0 - mu_theta(x_1, 1) = (1 - u a) x_0 - v - u b e
            sq = ((1 - u * a) * x0 - v) ** 2 + (u * b) ** 2
            out[:, 0] = (0.5 * math.log(2 * math.pi * s2[1]) + sq / (2 * s2[1])).sum(1)
            continue
        c0 = math.sqrt(ABAR[t - 1]) * beta[t] / (1 - ABAR[t])
        c1 = math.sqrt(alpha[t]) * (1 - ABAR[t - 1]) / (1 - ABAR[t])
        A, B, C = c0 + (c1 - u) * a, (c1 - u) * b, -v
        sq = (A * x0 + C) ** 2 + B**2
        out[:, t - 1] = (0.5 * (math.log(s2[t] / bt[t]) + bt[t] / s2[t] - 1) + sq / (2 * s2[t])).sum(1)
    return out


def test_plain_function_bound_matches_the_closed_form():
    """A plain function (pyro.module would refuse it), zero-based, run in float64: the closed-form terms."""
    x0 = torch.tensor(np.random.default_rng(0).normal(M, S, size=(400, D)))
    model, guide = adapters.from_callable(eps_zero_based, BETAS, (D,), levels=0, zero_based=True, dtype=torch.float64)
    assert list(model.eps.parameters()) == []
    L = evaluate.bound(model, guide, x0, draws=2).bound["L"].values  # (draws, N, T + 1) nats
    want = closed_form_terms(x0.numpy())
    np.testing.assert_allclose(L[:, :, T], np.broadcast_to(want[:, T], L[:, :, T].shape), rtol=1e-10)  # L_T: no noise
    d = L.mean(0).sum(-1) - want.sum(-1)
    assert abs(d.mean()) < 4 * d.std(ddof=1) / math.sqrt(len(d))
    for t in (0, 1, T - 1):  # term by term too
        d = L.mean(0)[:, t] - want[:, t]
        assert abs(d.mean()) < 4 * d.std(ddof=1) / math.sqrt(len(d)) + 1e-12


@pytest.mark.parametrize("zero_based,first", [(True, 0), (False, 1)])
def test_zero_based_network_sees_t_minus_one(zero_based, first):
    seen = set()

    def fn(x, t):
        seen.update(int(v) for v in t)
        return torch.zeros_like(x)

    model, guide = adapters.from_callable(fn, BETAS, (D,), levels=256, zero_based=zero_based)
    evaluate.bound(model, guide, torch.ones(2, D))
    assert seen == set(range(first, first + T))


def test_a_network_without_parameters_runs_in_the_images_dtype():
    seen = []

    def fn(x, t):
        seen.append((x.dtype, t.dtype))
        return torch.zeros_like(x)

    model, guide = adapters.from_callable(fn, BETAS, (D,), levels=256)
    x0 = adapters.to_grid(np.array([[0, 255], [17, 128]], dtype=np.uint8)).double()
    L = evaluate.bound(model, guide, x0).bound["L"].values
    assert np.isfinite(L).all() and L.dtype == np.float64
    assert {s[0] for s in seen} == {torch.float64} and {s[1] for s in seen} == {torch.int64}
    # the float t of the ODE reaches the network in the input's dtype, shifted for a zero-based one
    net = adapters.EpsNetwork(fn, zero_based=True)
    seen.clear()
    net(torch.zeros(3, D, dtype=torch.float32), torch.full((3,), 2.5, dtype=torch.float64))
    assert seen == [(torch.float32, torch.float32)]
    # an explicit dtype still wins
    seen.clear()
    adapters.EpsNetwork(fn, dtype=torch.float32)(torch.zeros(3, D, dtype=torch.float64), torch.ones(3))
    assert seen == [(torch.float32, torch.float32)]


def test_to_grid_maps_uint8_exactly():
    k = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    x = adapters.to_grid(k)
    assert x.dtype == torch.float32
    want = (k.astype(np.float64) / 127.5 - 1.0).astype(np.float32)  # one rounding from float64
    np.testing.assert_array_equal(x.numpy(), want)
    assert x.min() == -1.0 and x.max() == 1.0
    check_images(x, 256)
    hwc = adapters.to_grid(k.transpose(0, 2, 3, 1), channels_last=True)
    np.testing.assert_array_equal(hwc.numpy(), want)
    np.testing.assert_array_equal(adapters.to_grid(torch.tensor([[0, 16]]), levels=17).numpy(), [[-1.0, 1.0]])
    with pytest.raises(ValueError, match="levels 0..16"):
        adapters.to_grid(np.array([[0, 17]]), levels=17)
    with pytest.raises(ValueError, match="off the 256-level grid"):
        adapters.to_grid(torch.tensor([[0.001, 0.5]]))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown variance type 'huge'"):
        adapters.from_callable(eps_zero_based, BETAS, (D,), variance="huge")
    with pytest.raises(ValueError, match="shape"):
        adapters.from_callable(eps_zero_based, BETAS, "abc")
    with pytest.raises(ValueError, match="callable"):
        adapters.from_callable(3.0, BETAS, (D,))
    with pytest.raises(ValueError, match="0 < beta_t < 1"):
        adapters.from_callable(eps_zero_based, [0.1, 1.5], (D,))
    model, guide = adapters.from_callable(eps_zero_based, BETAS, (D,), levels=256)
    with pytest.raises(ValueError, match="data shape"):
        adapters.bound_of((model, guide), np.zeros((2, 3), dtype=np.uint8))


def test_improved_diffusion_learned_sigma_matches_the_native_path():
    """A 2C-output network with zero-based t and their rescale_timesteps: by hand vs the adapter."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(D + 1, 16), nn.Tanh(), nn.Linear(16, 2 * D))

    class Net(nn.Module):  # improved-diffusion's call signature: model(x, timesteps)
        def __init__(self):
            super().__init__()
            self.body, self.seen = body, []

        def forward(self, x, timesteps):
            self.seen.append(timesteps)
            return self.body(torch.cat([x, timesteps.float()[:, None] / 1000], 1))

    net = Net()
    model, guide = adapters.from_improved_diffusion(
        net, BETAS, learn_sigma=True, levels=256, shape=(D,), rescale_timesteps=True
    )
    assert isinstance(model, LearnedVarianceReverseProcess)

    class Hand(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x, (t - 1).double() * (1000.0 / T))

    hand = LearnedVarianceReverseProcess(
        Hand(), Schedule(BETAS), "learned", DiscretizedGaussianLikelihood(256), shape=(D,)
    )
    x0 = adapters.to_grid(np.random.default_rng(1).integers(0, 256, size=(6, D)))
    a = evaluate.bound(model, guide, x0).bound["L"].values
    net.seen.clear()
    b = evaluate.bound(hand, ForwardProcess(hand.schedule, event_dim=1), x0).bound["L"].values
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert float(net.seen[0].max()) == pytest.approx(900.0) and float(net.seen[0].min()) == 0.0
    m2, _ = adapters.from_improved_diffusion(net, BETAS, shape=(D,))
    m3, _ = adapters.from_improved_diffusion(net, BETAS, shape=(D,), sigma_small=True)
    assert (m2.variance, m3.variance) == ("large", "small")


# ----------------------------------------------------------------- diffusers (real third-party code)
def tiny_unet(out_channels=1):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


class ByHand(nn.Module):
    """The UNet in the library's convention, written out: unet(x, t - 1).sample (shift=0) or unet(x, t) (shift=1)."""

    def __init__(self, unet, shift=0):
        super().__init__()
        self.unet, self.shift = unet, shift

    def forward(self, x, t):
        return self.unet(x, t - 1 + self.shift).sample


@pytest.fixture(scope="module")
def images():
    return adapters.to_grid(np.random.default_rng(2).integers(0, 256, size=(4, 1, 8, 8), dtype=np.uint8))


def native_bound(net, scheduler, variance, x0, cls=ReverseProcess):
    schedule = Schedule(scheduler.betas.double().numpy())
    model = cls(net, schedule, variance, DiscretizedGaussianLikelihood(256), shape=(1, 8, 8))
    return evaluate.bound(model, ForwardProcess(schedule, event_dim=3), x0).bound["L"].values


@pytest.mark.parametrize("kind,variance", [("fixed_small", "small"), ("fixed_large", "large")])
def test_diffusers_unet_matches_the_hand_wrapped_native_path(kind, variance, images):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type=kind)
    model, guide = adapters.from_diffusers(unet, scheduler)
    assert model.variance == variance and model.T == T
    np.testing.assert_array_equal(model.schedule.betas.numpy(), scheduler.betas.numpy().astype(np.float64))
    got = evaluate.bound(model, guide, images).bound["L"].values
    want = native_bound(ByHand(unet), scheduler, variance, images)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    shifted = native_bound(ByHand(unet, shift=1), scheduler, variance, images)
    assert np.abs(shifted[..., 1:T] - got[..., 1:T]).max() > 1e-3  # the t convention is pinned


def test_diffusers_learned_range_matches_learned_variance_by_hand(images):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet(out_channels=2)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type="learned_range")
    model, guide = adapters.from_diffusers(unet, scheduler)
    assert isinstance(model, LearnedVarianceReverseProcess)
    got = evaluate.bound(model, guide, images).bound["L"].values
    want = native_bound(ByHand(unet), scheduler, "learned", images, cls=LearnedVarianceReverseProcess)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2 output channels"):
        adapters.from_diffusers(tiny_unet(out_channels=1), scheduler)


def test_saved_pipeline_reloads_offline_with_the_same_bound(tmp_path, images):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    want = evaluate.bound(*adapters.from_diffusers(unet, scheduler), images).bound["L"].values
    model, guide = adapters.from_diffusers_pipeline(tmp_path)
    np.testing.assert_allclose(evaluate.bound(model, guide, images).bound["L"].values, want, rtol=1e-6, atol=1e-6)
    k = np.round((images.numpy() + 1) * 127.5).astype(np.uint8)  # the same images as uint8
    idata, summary = adapters.bound_of(str(tmp_path), k)
    np.testing.assert_allclose(idata.bound["L"].values, want, rtol=1e-6, atol=1e-6)
    assert summary["total"]["bits_per_dim"] == pytest.approx(want.sum(-1).mean() / (64 * math.log(2)), rel=1e-6)
    with pytest.raises(ValueError, match="not a saved pipeline folder"):
        adapters.from_diffusers_pipeline(tmp_path / "nothing")


def test_diffusers_odd_schedulers_are_refused():
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    with pytest.raises(ValueError, match="unknown variance type 'learned'"):
        adapters.from_diffusers(unet, diffusers.DDPMScheduler(num_train_timesteps=T, variance_type="learned"))
    with pytest.raises(ValueError, match="prediction_type 'v_prediction'"):
        adapters.from_diffusers(unet, diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type="v_prediction"))


def test_missing_diffusers_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ValueError, match=r'pip install -e "\.\[diffusers\]"'):
        adapters.from_diffusers(object(), object())
    with pytest.raises(ValueError, match=r'pip install -e "\.\[diffusers\]"'):
        adapters.from_diffusers_pipeline("somewhere")


def test_ode_and_importance_weighted_run_on_a_diffusers_unet(images):
    """The other two estimators take the adapter's model unchanged (float t reaches the UNet)."""
    diffusers = pytest.importorskip("diffusers")
    from pyro_ddpm.importance_weighted import importance_weighted
    from pyro_ddpm.ode import ode_likelihood

    model, guide = adapters.from_diffusers(tiny_unet(), diffusers.DDPMScheduler(num_train_timesteps=T))
    r = ode_likelihood(model, images[:2], steps=3, probes=1, seed=0)
    assert r["settings"]["divergence"] == "rademacher" and r["settings"]["levels"] == 256
    assert r["network_calls"] == 12 and np.isfinite(r["nats"]).all() and r["bits_per_dim"] > 0
    k = np.round((images[:2].numpy() + 1) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(
        ode_likelihood(model, torch.as_tensor(k), steps=3, seed=0)["nats"], r["nats"], rtol=1e-12
    )
    iw = importance_weighted(model, guide, images[:2], particles=2)
    assert np.isfinite(iw["nats"]).all() and iw["bits_per_dim"] > 0
