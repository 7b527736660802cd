"""Schedule: every buffer against independent float64 formulas of docs/math.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_ddpm.schedule import Schedule

pytestmark = pytest.mark.usefixtures("float64")

USER_BETAS = np.array([0.1, 0.3, 0.05, 0.5, 0.2, 0.9, 0.01])

# name -> (constructor, independent beta_1..beta_T)
SCHEDULES = {
    "linear-6": (lambda: Schedule.linear(6, 0.05, 0.4), lambda ref: ref.linear_betas(6, 0.05, 0.4)),
    "linear-default": (lambda: Schedule.linear(), lambda ref: ref.linear_betas(1000, 1e-4, 0.02)),
    "cosine-8": (lambda: Schedule.cosine(8), lambda ref: ref.cosine_betas(8)),
    "cosine-default": (lambda: Schedule.cosine(), lambda ref: ref.cosine_betas(1000)),
    "user": (lambda: Schedule(USER_BETAS), lambda ref: USER_BETAS.copy()),
    "user-tensor": (lambda: Schedule(torch.tensor(USER_BETAS)), lambda ref: USER_BETAS.copy()),
}

BUFFERS_FROM_1 = [
    "beta",
    "alpha",
    "abar",
    "abar_prev",
    "sqrt_abar",
    "sqrt_one_minus_abar",
    "beta_tilde",
    "coef_x0",
    "coef_xt",
    "eps_coef",
    "recip_sqrt_alpha",
    "sigma2_large",
    "sigma2_small",
    "w_large",
    "w_small",
]


def _np(x):
    return x.detach().cpu().double().numpy()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_buffers_match_math_doc(name, ref):
    make, betas = SCHEDULES[name]
    s = make()
    r = ref.constants(betas(ref))
    T = r["T"]
    assert s.T == T
    for buf in BUFFERS_FROM_1:
        got = getattr(s, buf)
        assert got.dtype == torch.float64, buf
        assert got.shape == (T + 1,), buf
        np.testing.assert_allclose(_np(got)[1:], r[buf][1:], rtol=1e-12, atol=0, err_msg=buf)
    for buf in ("C_large", "C_small"):
        got = _np(getattr(s, buf))
        assert got.shape == (T + 1,)
        # C_t = (r - 1 - log r) / 2 cancels as r -> 1 (the paper schedule has r - 1 ~ 1e-5), so
        # one-ulp differences in r show up at ~1e-19 absolute: allow that much, nothing more.
        np.testing.assert_allclose(got[2:], r[buf][2:], rtol=1e-12, atol=1e-17, err_msg=buf)
        assert got[1] == 0.0  # documented: the t = 1 term is the decoder, not a KL
    # the paper's t = 0 values
    assert s.beta[0].item() == 0.0
    assert s.alpha[0].item() == 1.0
    assert s.abar[0].item() == 1.0
    # the accessors
    np.testing.assert_allclose(_np(s.betas), betas(ref), rtol=1e-12, atol=0)
    for kind in ("large", "small"):
        v = s.variance(kind)
        np.testing.assert_allclose(_np(v.sigma2)[1:], r[f"sigma2_{kind}"][1:], rtol=1e-12, atol=0)
        np.testing.assert_allclose(_np(v.w)[1:], r[f"w_{kind}"][1:], rtol=1e-12, atol=0)
        np.testing.assert_allclose(_np(v.C)[2:], r[f"C_{kind}"][2:], rtol=1e-12, atol=1e-17)


def test_sigma1_replacement_and_small_variance_constant(ref):
    s = Schedule(USER_BETAS)
    r = ref.constants(USER_BETAS)
    bt2 = (1 - (1 - USER_BETAS[0])) / (1 - (1 - USER_BETAS[0]) * (1 - USER_BETAS[1])) * USER_BETAS[1]
    for kind in ("large", "small"):
        assert s.variance(kind).sigma2[1].item() == pytest.approx(bt2, rel=1e-12)
    # sigma_t^2 = beta_tilde_t makes C_t = 0 for t >= 2 (Eq. 12)
    np.testing.assert_allclose(_np(s.C_small)[2:], 0.0, atol=1e-15)
    assert np.all(_np(s.C_large)[2:] > 0)
    assert r["C_large"][2] > 0


def test_linear_default_is_paper_schedule():
    s = Schedule.linear()
    assert s.T == 1000
    assert s.beta[1].item() == pytest.approx(1e-4, rel=1e-14)
    assert s.beta[1000].item() == pytest.approx(0.02, rel=1e-14)
    d = np.diff(_np(s.betas))
    np.testing.assert_allclose(d, (0.02 - 1e-4) / 999, rtol=1e-9)


def test_cosine_matches_nichol_dhariwal():
    T, s_off = 20, 0.008
    s = Schedule.cosine(T)
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    # abar_t = f(t) / f(0) wherever beta is not clipped
    abar = _np(s.abar)
    for t in range(1, T):
        assert abar[t] == pytest.approx(f(t) / f(0), rel=1e-12)
    # beta_T = 1 - abar_T / abar_{T-1} ~ 1 is clipped at 0.999
    assert s.beta[T].item() == pytest.approx(0.999, rel=1e-15)
    s2 = Schedule.cosine(T, max_beta=0.5)
    assert float(s2.betas.max()) <= 0.5


@pytest.mark.parametrize(
    "bad",
    [
        [0.1, 0.0, 0.2],
        [0.1, -0.2, 0.2],
        [0.1, 1.0, 0.2],
        [0.1, 1.5, 0.2],
        [0.1, float("nan"), 0.2],
        [0.1, float("inf"), 0.2],
        [[0.1, 0.2], [0.3, 0.4]],
        [0.1],
        [],
    ],
    ids=["zero", "negative", "one", "above-one", "nan", "inf", "2d", "T=1", "empty"],
)
def test_user_betas_validated(bad):
    with pytest.raises(ValueError, match="schedule"):
        Schedule(np.array(bad, dtype=np.float64))
    with pytest.raises(ValueError, match="schedule"):
        Schedule(torch.tensor(bad, dtype=torch.float64))


def test_to_float32_moves_every_buffer():
    s = Schedule.linear(6, 0.05, 0.4)
    s32 = s.to(torch.float32)
    names = [n for n, _ in s32.named_buffers()]
    assert set(BUFFERS_FROM_1) | {"C_large", "C_small"} <= set(names)
    for n, b in s32.named_buffers():
        assert b.dtype == torch.float32, n
    fresh = Schedule.linear(6, 0.05, 0.4)
    np.testing.assert_allclose(s32.abar.double().numpy(), _np(fresh.abar), rtol=1e-6)
    assert s32.variance("small").w.dtype == torch.float32


def test_check_timesteps():
    s = Schedule.linear(6, 0.05, 0.4)
    s.check_timesteps(torch.arange(1, 7))
    s.check_timesteps(torch.tensor([[1, 6], [3, 2]]))
    for bad in (torch.tensor([0]), torch.tensor([1, 7]), torch.tensor([-1, 3])):
        with pytest.raises(ValueError, match="1..T"):
            s.check_timesteps(bad)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True])):
        with pytest.raises(ValueError, match="integer"):
            s.check_timesteps(bad)


def test_check_matches(ref):
    s = Schedule.linear(6, 0.05, 0.4)
    s.check_matches(ref.linear_betas(6, 0.05, 0.4))
    s.check_matches(torch.tensor(ref.linear_betas(6, 0.05, 0.4)))
    with pytest.raises(ValueError, match="T = 7"):
        s.check_matches(ref.linear_betas(7, 0.05, 0.4))
    other = ref.linear_betas(6, 0.05, 0.4)
    other[3] *= 1 + 1e-9
    with pytest.raises(ValueError, match="betas differ"):
        s.check_matches(other)


def test_from_name():
    np.testing.assert_array_equal(_np(Schedule.from_name("linear", 10).beta), _np(Schedule.linear(10).beta))
    np.testing.assert_array_equal(_np(Schedule.from_name("cosine", 10).beta), _np(Schedule.cosine(10).beta))
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule.from_name("quadratic", 10)


def test_unknown_variance_kind():
    with pytest.raises(ValueError, match="variance"):
        Schedule.linear(6, 0.05, 0.4).variance("medium")


@pytest.mark.parametrize("name", ["linear-6", "cosine-8", "user"])
def test_posterior_is_gaussian_conditioning_of_the_joint(name, ref):
    """Eq. 7 against conditioning the bivariate normal q(x_{t-1}, x_t | x_0), derived from Eq. 2 and 4."""
    from pyro_ddpm.guides import ForwardProcess

    make, betas_fn = SCHEDULES[name]
    s = make()
    betas = betas_fn(ref)
    T = len(betas)
    abar = np.cumprod(1.0 - betas)
    rng = np.random.default_rng(1)
    g = ForwardProcess(s)
    for t in range(1, T + 1):
        abar_prev = 1.0 if t == 1 else abar[t - 2]
        # x_{t-1} | x_0 ~ N(sqrt(abar_prev) x_0, 1 - abar_prev); x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e
        v_prev = 1.0 - abar_prev
        cov = math.sqrt(1.0 - betas[t - 1]) * v_prev
        v_t = (1.0 - betas[t - 1]) * v_prev + betas[t - 1]
        assert v_t == pytest.approx(1.0 - abar[t - 1], rel=1e-12)
        gain = cov / v_t
        coef_x0 = math.sqrt(abar_prev) - gain * math.sqrt(abar[t - 1])
        coef_xt = gain
        var = v_prev - cov * cov / v_t
        assert s.coef_x0[t].item() == pytest.approx(coef_x0, rel=1e-10, abs=1e-15)
        assert s.coef_xt[t].item() == pytest.approx(coef_xt, rel=1e-10, abs=1e-15)
        assert s.beta_tilde[t].item() == pytest.approx(var, rel=1e-10, abs=1e-15)
        if t >= 2:
            x0 = rng.uniform(-1, 1, size=(4, 3))
            xt = rng.normal(size=(4, 3))
            loc, scale = g.posterior(torch.tensor(xt), torch.tensor(x0), torch.full((4,), t))
            np.testing.assert_allclose(_np(loc), coef_x0 * x0 + coef_xt * xt, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(_np(scale), math.sqrt(var), rtol=1e-10)
        # and q(x_t | x_0) of Eq. 4
        x0 = rng.uniform(-1, 1, size=(2, 3))
        loc, scale = g.q_t(torch.tensor(x0), torch.full((2,), t))
        np.testing.assert_allclose(_np(loc), math.sqrt(abar[t - 1]) * x0, rtol=1e-12)
        np.testing.assert_allclose(_np(scale), math.sqrt(1 - abar[t - 1]), rtol=1e-12)


# ------------------------------------------------------------------ the shared derivation
@pytest.mark.parametrize("name", ["linear-6", "cosine-8", "user"])
def test_derive_is_the_buffers_and_differentiable(name, ref):
    """One function of beta gives every constant: equal to the buffers, with finite-difference-exact gradients."""
    from pyro_ddpm.schedule import CONSTANTS, derive

    make, betas_fn = SCHEDULES[name]
    s = make()
    betas = torch.tensor(betas_fn(ref), dtype=torch.float64, requires_grad=True)
    out = derive(betas)
    assert set(out) == set(CONSTANTS) == {n for n, _ in s.named_buffers()}
    for n in CONSTANTS:
        assert torch.equal(out[n].detach(), getattr(s, n)), n
    # gradients everywhere (t = 0 slots included) are finite and match central differences
    if name == "cosine-8":  # beta_T = 0.999 sits at the clip: move it inside (0, 1) for the check
        betas = torch.tensor(np.minimum(betas_fn(ref), 0.9), dtype=torch.float64, requires_grad=True)
    total = sum((derive(betas)[n] * (k + 1)).sum() for k, n in enumerate(CONSTANTS))
    (grad,) = torch.autograd.grad(total, betas)
    assert torch.isfinite(grad).all()
    assert torch.autograd.gradcheck(
        lambda b: tuple(derive(b)[n] for n in CONSTANTS), (betas,), eps=1e-7, atol=1e-6, rtol=1e-5
    )
