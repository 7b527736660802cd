"""Discrete-state diffusion (the masked and the uniform categorical families) against exact enumeration.

Every expected number is derived here in numpy float64, independently of the code under test:

- one element's forward process from its one-step transition matrices Q_t (masked: a level stays with
  a_t = alpha_t / alpha_{t-1}, else goes to the absorbing state M = K, and M stays; uniform:
  Q_t = a_t I + (1 - a_t) 11^T / K), Qbar_t = Q_1 ... Q_t (so q(x_t | x_0) = Qbar_t[x_0]), and the
  posterior q(x_{t-1} | x_t, x_0) by Bayes, proportional to Q_t[x_{t-1}, x_t] Qbar_{t-1}[x_0, x_{t-1}];
- the model's p_theta(x_0 | x_t) proportional to exp(l_k) q(x_t | x_0 = k) and its transition, the
  posterior mixture sum_k p_theta(x_0 = k | x_t) q(x_{t-1} | x_t, x_0 = k), from the logits l of a
  hand-written network (a table indexed by t and the whole x_t, read directly, never through the model);
- the expectations over x_t ~ q(x_t | x_0) by summing over every state of x_t with its probability, and
  log p_theta(x_0) exactly by the forward algorithm over all (S)^D joint states of the reverse chain.

The library's per-pair terms are read by conditioning the guide's ``x_t`` on each enumerated state
(:class:`~pyro_ddpm.protocol.FixedNoise` with a draw that returns the given state).

Data: D = 2 elements, shape (2,) (C = 2 channels, the network sees (B, 4) and returns (B, 2K)).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from pyro_ddpm import evaluate, protocol
from pyro_ddpm.discrete import CategoricalForwardProcess
from pyro_ddpm.elbo import TermwiseELBO, objective
from pyro_ddpm.guides import ForwardProcess, MaskedForwardProcess, UniformForwardProcess
from pyro_ddpm.importance_weighted import importance_weighted
from pyro_ddpm.likelihoods import BernoulliLikelihood, DiscretizedGaussianLikelihood
from pyro_ddpm.models import CategoricalReverseProcess
from pyro_ddpm.programs import ForwardProgram, ReverseProgram, check_pair, require
from pyro_ddpm.sample import sampling_program

pytestmark = pytest.mark.usefixtures("float64")

FAMILIES = {"masked": MaskedForwardProcess, "uniform": UniformForwardProcess}
SCHEDULES = ("linear", "cosine")
D = 2  # elements per datum


# =========================================================================== numpy references
def np_alpha(name: str, T: int) -> np.ndarray:
    """alpha_t, t = 0..T: linear 1 - t/T, cosine 1 - cos(pi/2 (1 - t/T)); alpha_0 = 1, alpha_T = 0."""
    out = []
    for t in range(T + 1):
        if t == 0:
            out.append(1.0)
        elif t == T:
            out.append(0.0)
        elif name == "linear":
            out.append(1.0 - t / T)
        else:
            out.append(1.0 - math.cos(0.5 * math.pi * (1.0 - t / T)))
    return np.array(out)


class Ref:
    """One element's forward process and the x_0-parameterized model's per-element pieces (numpy)."""

    def __init__(self, family: str, schedule: str, K: int, T: int):
        self.family, self.K, self.T = family, K, T
        self.alpha = np_alpha(schedule, T)
        self.S = S = K + 1 if family == "masked" else K
        self.Q = np.full((T + 1, S, S), np.nan)  # Q[t][j, i] = q(x_t = i | x_{t-1} = j)
        for t in range(1, T + 1):
            a = self.alpha[t] / self.alpha[t - 1]
            if family == "masked":
                Q = np.zeros((S, S))
                for j in range(K):
                    Q[j, j], Q[j, K] = a, 1.0 - a
                Q[K, K] = 1.0
            else:
                Q = a * np.eye(K) + (1.0 - a) / K * np.ones((K, K))
            self.Q[t] = Q
        self.Qbar = np.zeros((T + 1, S, S))
        self.Qbar[0] = np.eye(S)
        for t in range(1, T + 1):
            self.Qbar[t] = self.Qbar[t - 1] @ self.Q[t]
        self.marg = self.Qbar[:, :K, :]  # marg[t, x0, x_t] = q(x_t | x_0)
        # post[t, x_t, x0, x_{t-1}] = q(x_{t-1} | x_t, x_0) by Bayes (zeros where x_t is unreachable from x_0)
        self.post = np.zeros((T + 1, S, K, S))
        for t in range(1, T + 1):
            for i in range(S):
                for k in range(K):
                    joint = self.Q[t][:, i] * self.Qbar[t - 1][k, :]
                    if joint.sum() > 0:
                        self.post[t, i, k] = joint / joint.sum()
        self.prior = np.full(S, 1.0 / K) if family == "uniform" else np.eye(S)[K]

    # ------------------------------------------------------------------ the model, per element
    def x0_probs(self, logits: np.ndarray, state, t: int) -> np.ndarray:
        """p_theta(x_0 = k | x_t) per element: (D, K) from logits (D, K) and the joint state x_t (D,)."""
        evidence = self.marg[t][:, np.asarray(state)].T  # (D, K): q(x_t,i | x_0 = k)
        un = np.exp(logits - logits.max(-1, keepdims=True)) * evidence
        z = un.sum(-1, keepdims=True)
        # a state no x_0 reaches (x_T with a level, masked family): any distribution, it has probability 0
        return np.where(z > 0, un / np.where(z > 0, z, 1.0), 1.0 / self.K)

    def prev_probs(self, p0: np.ndarray, state, t: int) -> np.ndarray:
        """p_theta(x_{t-1} | x_t) per element: (D, S), the posterior mixture."""
        return np.einsum("dk,dks->ds", p0, self.post[t][np.asarray(state)])

    # ------------------------------------------------------------------ enumeration helpers
    def states(self) -> np.ndarray:
        """Every joint state of x_t, (S^D, D), index s_0 S^{D-1} + ... + s_{D-1} (the table's row)."""
        return np.array(list(itertools.product(range(self.S), repeat=D)))

    def data(self) -> np.ndarray:
        """Every datum as level indices, (K^D, D)."""
        return np.array(list(itertools.product(range(self.K), repeat=D)))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum_j p_j log(p_j / q_j) over p_j > 0."""
    keep = p > 0
    return float(np.sum(p[keep] * (np.log(p[keep]) - np.log(q[keep]))))


def pair_term(ref: Ref, logits: np.ndarray, x0, state, t: int) -> float:
    """The bound's term at (x_0, x_t): KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) summed over the
    elements for t > 1, -log p_theta(x_0 | x_1) for t = 1."""
    p0 = ref.x0_probs(logits, state, t)
    if t == 1:
        return float(-np.log(p0[np.arange(D), x0]).sum())
    prev = ref.prev_probs(p0, state, t)
    return sum(kl(ref.post[t, state[d], x0[d]], prev[d]) for d in range(D))


def reference_bound(ref: Ref, table: np.ndarray) -> np.ndarray:
    """The bound per datum (K^D,), entirely in numpy: L_T + sum_t E_{q(x_t | x_0)}[pair term]."""
    data, states = ref.data(), ref.states()
    out = np.array([sum(kl(ref.marg[ref.T][x[d]], ref.prior) for d in range(D)) for x in data])
    for t in range(1, ref.T + 1):
        for a, x in enumerate(data):
            q = np.prod(ref.marg[t][x[None, :], states], axis=1)
            for n in np.nonzero(q > 0)[0]:
                out[a] += q[n] * pair_term(ref, table[t, n].reshape(D, ref.K), x, states[n], t)
    return out


def exact_px0(ref: Ref, logits_fn) -> np.ndarray:
    """p_theta(x_0) of every datum (K^D,): the forward algorithm over the S^D joint states.

    ``logits_fn(t, n, state)`` -> (D, K) logits of the network at x_t = joint state n.
    """
    states, data = ref.states(), ref.data()
    N, el = len(states), np.arange(D)
    p = np.prod(ref.prior[states], axis=1)  # p(x_T)
    for t in range(ref.T, 1, -1):
        P = np.zeros((N, N))
        for n, s in enumerate(states):
            pp = ref.prev_probs(ref.x0_probs(logits_fn(t, n, s), s, t), s, t)  # (D, S)
            P[n] = np.prod(pp[el, states], axis=1)
        p = p @ P
    dec = np.zeros((N, len(data)))
    for n, s in enumerate(states):
        p0 = ref.x0_probs(logits_fn(1, n, s), s, 1)
        dec[n] = np.prod(p0[el, data], axis=1)
    return p @ dec


def grid_value(k, K: int) -> torch.Tensor:
    return torch.as_tensor(-1.0 + 2.0 * np.asarray(k, dtype=np.float64) / (K - 1))


# =========================================================================== networks
def decode_states(h: torch.Tensor, K: int) -> torch.Tensor:
    """The joint state of x_t from the network input h = (value, mask indicator) (B, 2D): (B, D) indices."""
    value, masked = h[:, :D], h[:, D:]
    k = ((value + 1.0) * (K - 1) / 2.0).round().long()
    return torch.where(masked > 0.5, torch.full_like(k, K), k)


class TableNet(nn.Module):
    """Logits l(x_t, t) = table[t, joint state of x_t]: (B, D*K), element d's K logits contiguous."""

    def __init__(self, table: np.ndarray, K: int, S: int):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float64))
        self.K, self.S = K, S

    def forward(self, h, t):
        s = decode_states(h, self.K)
        index = sum(s[:, d] * self.S ** (D - 1 - d) for d in range(D))
        return self.table[t, index]

    def logits(self, t: int, n: int, state=None) -> np.ndarray:
        return self.table.detach().numpy()[t, n].reshape(D, self.K)


class PerfectNet(nn.Module):
    """Ignores its input: logit 30 at the one training datum's level per element, 0 elsewhere."""

    def __init__(self, x0_levels, K: int, big: float = 30.0):
        super().__init__()
        table = np.zeros((D, K))
        table[np.arange(D), np.asarray(x0_levels)] = big
        self.out = nn.Parameter(torch.as_tensor(table.reshape(-1)))  # float64: the model runs in float64
        self.table = table

    def forward(self, h, t):
        return self.out.expand(h.shape[0], -1)

    def logits(self, t, n, state=None):
        return self.table


def likelihood(K: int):
    return BernoulliLikelihood() if K == 2 else DiscretizedGaussianLikelihood(K)


def build(family: str, schedule: str, K: int, T: int, net: nn.Module | None = None, seed: int = 0, scale: float = 2.0):
    """(reference, guide, model, network) for data of shape (D,); the network a random table unless given."""
    ref = Ref(family, schedule, K, T)
    guide = FAMILIES[family](T, K, schedule, event_dim=1)
    if net is None:
        rng = np.random.default_rng(seed)
        network = TableNet(rng.normal(0.0, scale, size=(T + 1, ref.S**D, D * K)), K, ref.S)
    else:
        network = net
    model = CategoricalReverseProcess(network, guide.schedule, likelihood(K), shape=(D,))
    return ref, guide, model, network


def given_state(fn, value):
    """A FixedNoise draw that returns the given state itself."""
    return value


def library_terms(model, guide, x0_levels: np.ndarray, states: np.ndarray, t, weight=None):
    """The library's terms with x_t conditioned to ``states`` (N, D) for data ``x0_levels`` (N, D) at
    timestep ``t`` (an int, one per datum); both are reshaped to the model's data shape."""
    K, shape = model.levels, tuple(model.shape)
    x0 = grid_value(x0_levels, K).reshape(-1, *shape)
    states = np.asarray(states).reshape(-1, *shape)
    tt = torch.full((x0.shape[0], 1), int(t), dtype=torch.long)
    guide_fn = protocol.FixedNoise({protocol.X_t: torch.as_tensor(states, dtype=torch.long)}, given_state)(
        guide.per_timestep
    )
    with torch.no_grad():
        return TermwiseELBO().terms(model.per_timestep, guide_fn, x0, tt, weight)


def reachable_rows(ref: Ref, t: int):
    """Every (datum, x_t state) pair with q(x_t | x_0) > 0: (x0 levels, states, probabilities, datum index,
    state index)."""
    data, states = ref.data(), ref.states()
    rows = []
    for a, x0 in enumerate(data):
        q = np.prod(ref.marg[t][x0[None, :], states], axis=1)
        for n in np.nonzero(q > 0)[0]:
            rows.append((a, n, q[n]))
    a, n, q = map(np.array, zip(*rows))
    return data[a], states[n], q, a, n


def exact_library_bound(ref: Ref, model, guide) -> np.ndarray:
    """The library's bound per datum (K^D,), its expectation over x_t taken exactly: sum over t of
    sum over states q(x_t | x_0) * the library's per-pair term (plus L_T the same way)."""
    out = np.zeros(len(ref.data()))
    for t in range(1, ref.T + 1):
        x0, st, q, a, _ = reachable_rows(ref, t)
        terms = library_terms(model, guide, x0, st, t)
        pair = (terms[protocol.X_PREV].value + terms[protocol.X_0].value).numpy()
        np.add.at(out, a, q * pair)
        if t == ref.T:  # L_T per datum: the q-weighted rows of a datum sum to it
            np.add.at(out, a, q * terms[protocol.X_T].value.numpy())
    return out


# =========================================================================== 0. the forward tables
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_marginals_and_posteriors_match_bayes(family, schedule):
    """q(x_t | x_0) and q(x_{t-1} | x_t, x_0) of the guide equal the matrix-product / Bayes tables, and the
    closed forms of the module docstrings."""
    K, T = 3, 6
    ref = Ref(family, schedule, K, T)
    guide = FAMILIES[family](T, K, schedule, event_dim=1)
    a = ref.alpha
    np.testing.assert_allclose(guide.schedule.alpha.numpy(), a, rtol=1e-13, atol=1e-15)
    for t in range(1, T + 1):
        x0 = torch.arange(K, dtype=torch.float64) * 2 / (K - 1) - 1
        probs = guide.q_xt(x0[:, None], torch.full((K,), t)).probs[:, 0].numpy()
        np.testing.assert_allclose(probs, ref.marg[t], atol=1e-14)
        closed = a[t] * np.eye(ref.S)[:K] + ((1 - a[t]) * np.eye(ref.S)[K] if family == "masked" else (1 - a[t]) / K)
        np.testing.assert_allclose(ref.marg[t], closed, atol=1e-14)
        if t == 1:
            continue
        for i in range(ref.S):
            for k in range(K):
                if ref.marg[t][k, i] == 0:
                    continue
                post = guide.q_prev(torch.tensor([[i]]), x0[k].reshape(1, 1), torch.tensor([t])).probs[0, 0].numpy()
                np.testing.assert_allclose(post, ref.post[t, i, k], atol=1e-14)
    if family == "masked":  # the weight w_t = (alpha_{t-1} - alpha_t) / (1 - alpha_t): the unmasking probability
        w = (a[:-1] - a[1:]) / (1 - a[1:])
        np.testing.assert_allclose(guide.schedule.weight.numpy()[1:], w, rtol=1e-12)
        np.testing.assert_allclose(ref.post[2:, K, np.arange(K), np.arange(K)].T, np.tile(w[1:], (K, 1)), rtol=1e-12)


# =========================================================================== 1. per-term KLs
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("K,T", [(3, 6), (4, 5), (2, 4)])
def test_each_term_equals_the_enumerated_kl(family, schedule, K, T):
    """For every t, every datum and every x_t with q(x_t | x_0) > 0: the library's L_{t-1} pair term is
    KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) summed over elements, L_0 is -log p_theta(x_0 | x_1),
    L_T is KL(q(x_T | x_0) || p(x_T)); and their q-weighted sums (the terms of the bound) agree."""
    ref, guide, model, net = build(family, schedule, K, T, seed=K * 10 + T)
    for t in range(1, T + 1):
        x0, st, q, a, n = reachable_rows(ref, t)
        terms = library_terms(model, guide, x0, st, t)
        got = (terms[protocol.X_PREV].value + terms[protocol.X_0].value).numpy()
        want = np.array([pair_term(ref, net.logits(t, n[r]), x0[r], st[r], t) for r in range(len(q))])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        # the term of the bound for each datum: E_{x_t ~ q(x_t | x_0)}[...] by summing over the states
        assert np.allclose(np.bincount(a, weights=q), 1.0, atol=1e-13)
        np.testing.assert_allclose(
            np.bincount(a, weights=q * got), np.bincount(a, weights=q * want), rtol=1e-10, atol=1e-12
        )
        # L_T: KL(q(x_T | x_0) || p(x_T)) per element, from the marginals and the prior
        L_T = [sum(kl(ref.marg[T][x0[r][d]], ref.prior) for d in range(D)) for r in range(len(q))]
        np.testing.assert_allclose(terms[protocol.X_T].value.numpy(), L_T, atol=1e-12)
        # the pair terms carry the plate's unbiasing scale T / K (one timestep per datum here)
        assert float(terms[protocol.X_PREV].scale) == pytest.approx(T)
    # alpha_T = 0: x_T carries nothing of x_0 in either family, so L_T = 0 exactly
    assert np.allclose(L_T, 0.0, atol=1e-14)


# =========================================================================== 2. the exact marginal likelihood
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bounds_against_the_exact_marginal_likelihood(family, schedule):
    """K = 3, T = 8, logits depending on (x_t, t) through a random table: -log p_theta(x_0) by the forward
    algorithm lies below the bound (exact expectation) for every datum; the evaluator's Monte-Carlo bound
    and the importance-weighted L_1 are unbiased for that bound; L_K decreases toward the exact NLL."""
    K, T = 3, 8
    ref, guide, model, net = build(family, schedule, K, T, seed=7)
    px = exact_px0(ref, net.logits)
    assert px.sum() == pytest.approx(1.0, abs=1e-12) and (px > 0).all()
    nll = -np.log(px)
    b = exact_library_bound(ref, model, guide)
    assert (b >= nll - 1e-12).all()
    assert (b - nll).mean() > 0.5  # a model far from its data's posterior: the bound is loose

    data = ref.data()
    # the evaluator: its Monte-Carlo draws of x_t average to the exact expectation
    draws = 40
    L = evaluate.bound(model, guide, grid_value(data, K), draws=draws, seed=3).bound["L"].values  # (draw, image, t)
    diff = L.sum(-1) - b[None, :]
    assert abs(diff.mean()) < 4.5 * diff.std(ddof=1) / math.sqrt(diff.size)

    # the importance-weighted bound: R copies of every datum
    R = 40
    idx = np.repeat(np.arange(len(data)), R)
    x0 = grid_value(data[idx], K)
    gap, se = {}, {}
    for particles in (1, 8, 64):
        out = importance_weighted(model, guide, x0, particles=particles, max_chains=4096, seed=particles)
        d = out["nats"] - nll[idx]
        gap[particles], se[particles] = d.mean(), d.std(ddof=1) / math.sqrt(d.size)
        assert gap[particles] > -4.5 * se[particles]  # every L_K bounds the NLL
        e = out["elbo_nats"] - b[idx]  # the mean of -log w over the chains: the bound, through the chain form
        assert abs(e.mean()) < 4.5 * e.std(ddof=1) / math.sqrt(e.size)
        if particles == 1:  # L_1 = -log w of one chain: unbiased for the bound
            e = out["nats"] - b[idx]
            assert abs(e.mean()) < 4.5 * e.std(ddof=1) / math.sqrt(e.size)
    assert gap[8] < gap[1] + 4.5 * math.hypot(se[1], se[8])
    assert gap[64] < gap[8] + 4.5 * math.hypot(se[8], se[64])
    assert gap[64] < 0.3 * (b - nll).mean() and gap[64] < gap[1] - 4.5 * math.hypot(se[1], se[64])


# =========================================================================== 3. a perfect predictor
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_perfect_predictor_bound_equals_exact_nll(family, schedule):
    """One-image data and a network that predicts it (logit 30 against 0): the reverse chain is then the
    forward posterior chain, so the bound, the importance-weighted bound and -log p_theta(x_0) coincide
    (all ~0: p_theta puts mass 1 - O(e^-30) on the training image)."""
    K, T = 3, 8
    x0_levels = np.array([1, 2])
    net = PerfectNet(x0_levels, K)
    ref, guide, model, _ = build(family, schedule, K, T, net=net)
    px = exact_px0(ref, net.logits)
    assert px.sum() == pytest.approx(1.0, abs=1e-12)
    a0 = int(np.nonzero((ref.data() == x0_levels).all(1))[0][0])
    nll = -math.log(px[a0])
    assert -1e-12 < nll < 1e-9
    b = exact_library_bound(ref, model, guide)[a0]
    assert b == pytest.approx(nll, abs=1e-10)
    x0 = grid_value(x0_levels[None], K)
    L = evaluate.bound(model, guide, x0, draws=4).bound["L"].values.sum(-1)
    np.testing.assert_allclose(L, nll, atol=1e-10)
    iw = importance_weighted(model, guide, x0.expand(8, D), particles=4)
    np.testing.assert_allclose(iw["nats"], nll, atol=1e-10)
    # every other datum is (almost) impossible under the model
    assert (np.delete(px, a0) < 1e-11).all()


# =========================================================================== 4. the training form is unbiased
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_form_averaged_over_timesteps_is_the_bound(family, schedule):
    """With x_t's noise fixed per (image, t), the per-timestep loss at m timesteps per image drawn uniformly,
    (T/m) sum_j L_{t_j - 1} + L_T (the plate's scale T/m), averaged exactly over all T^m draws equals the full
    bound (the evaluator's, with the same noise), for m = 1 and m = 2."""
    K, T = 3, 6
    ref, guide, model, net = build(family, schedule, K, T, seed=11)
    data = ref.data()
    x0 = grid_value(data, K)
    N = len(data)
    U = torch.rand((1, N, T, D), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full = evaluate.bound(model, guide, x0, noise=U).bound["L"].values[0].sum()  # all images, all terms
    elbo = TermwiseELBO()

    def loss(steps):
        t = torch.tensor(steps).expand(N, -1)
        eps = U[0][:, [s - 1 for s in steps]].reshape(N * len(steps), D)
        guide_fn = protocol.FixedNoise({protocol.X_t: eps}, guide.from_noise)(guide.per_timestep)
        with torch.no_grad():
            terms = elbo.terms(model.per_timestep, guide_fn, x0, t)
        assert float(terms[protocol.X_PREV].scale) == pytest.approx(T / len(steps))
        return float(elbo.loss_from_terms(terms))

    one = np.mean([loss([s]) for s in range(1, T + 1)])
    two = np.mean([loss([s, r]) for s in range(1, T + 1) for r in range(1, T + 1)])
    assert one == pytest.approx(full, rel=1e-10)
    assert two == pytest.approx(full, rel=1e-10)
    assert full > 1.0  # not a vacuous identity


# =========================================================================== 5. masked: weighted cross-entropies
def masked_cross_entropy(logits: np.ndarray, state, x0) -> float:
    """-sum over the masked elements i of log softmax(l_i)[x0_i] (a masked element's evidence
    q(x_t = M | x_0 = k) = 1 - alpha_t is the same for every k)."""
    out = 0.0
    for d in range(D):
        if state[d] == logits.shape[-1]:  # the mask state M = K
            l = logits[d]
            out -= l[x0[d]] - (l.max() + math.log(np.exp(l - l.max()).sum()))
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_masked_terms_are_weighted_cross_entropies(schedule):
    """Masked family: each pair term L_{t-1} (L_0 at t = 1) at a given x_t is w_t times the cross-entropy
    over the masked elements, w_t = (alpha_{t-1} - alpha_t) / (1 - alpha_t) (w_1 = 1); the ``simple``
    objective's weights lambda_t = 1 / (T w_t) with the plate's scale T/K make each pair contribute the
    plain cross-entropy / K (K timesteps per image)."""
    K, T = 3, 6
    ref, guide, model, net = build("masked", schedule, K, T, seed=21)
    a = ref.alpha
    program, weight = model.training_program("simple")
    assert program is model
    w = (a[:-1] - a[1:]) / (1 - a[1:])  # w[t - 1] = w_t
    assert w[0] == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(weight.numpy()[1:], 1.0 / (T * w), rtol=1e-12)
    seen_masked = 0
    for t in range(1, T + 1):
        x0, st, q, _, n = reachable_rows(ref, t)
        ce = np.array([masked_cross_entropy(net.logits(t, n[r]), st[r], x0[r]) for r in range(len(q))])
        seen_masked += int((ce > 0).sum())
        terms = library_terms(model, guide, x0, st, t)
        got = (terms[protocol.X_PREV].value + terms[protocol.X_0].value).numpy()
        np.testing.assert_allclose(got, w[t - 1] * ce, rtol=1e-12, atol=1e-14)
        # L_simple: one timestep per image (K = 1): scale T * lambda_t = 1 / w_t, contribution = ce
        terms = library_terms(model, guide, x0, st, t, weight)
        contrib = sum((terms[s].value * terms[s].scale).numpy() for s in (protocol.X_PREV, protocol.X_0))
        np.testing.assert_allclose(contrib, ce, rtol=1e-12, atol=1e-14)
        assert float(terms[protocol.X_T].scale) == 1.0  # L_T is not reweighted
    assert seen_masked > 0

    # all T timesteps per image (K = T): each pair contributes ce / T; x_t drawn by the guide
    data = ref.data()
    x0 = grid_value(data, K)
    t = protocol.all_timesteps(len(data), T)
    elbo = TermwiseELBO()
    with torch.no_grad():
        model_trace, guide_trace = elbo.traces(model.per_timestep, guide.per_timestep, x0, t, weight)
        terms = elbo.terms_from_traces(model_trace, guide_trace)
    x_t = guide_trace.nodes[protocol.X_t]["value"].numpy()  # (N * T, D): pair b * T + (t - 1)
    contrib = sum((terms[s].value * terms[s].scale).numpy() for s in (protocol.X_PREV, protocol.X_0))
    want = []
    for b, x in enumerate(data):
        for s in range(1, T + 1):
            state = x_t[b * T + s - 1]
            n = int(sum(state[d] * ref.S ** (D - 1 - d) for d in range(D)))
            want.append(masked_cross_entropy(net.logits(s, n), state, x) / T)
    np.testing.assert_allclose(contrib, want, rtol=1e-12, atol=1e-14)
    assert (np.array(want) > 0).sum() > len(want) // 4


def test_simple_objective_needs_weighted_terms():
    """The uniform family's terms are not weighted cross-entropies: ``simple`` is refused, naming ``elbo``."""
    _, _, model, _ = build("uniform", "linear", 3, 4)
    assert model.training_program("elbo") == (model, None)
    with pytest.raises(ValueError, match="UniformSchedule.*'elbo'"):
        model.training_program("simple")
    assert tuple(model.objectives) == ("elbo",)
    with pytest.raises(ValueError, match="does not train on objective 'simple'; it supports \\['elbo'\\]"):
        objective("simple", model)
    _, _, masked, _ = build("masked", "linear", 3, 4)
    program, weight = objective("simple", masked)
    assert program is masked and weight is not None


# =========================================================================== 6. from_noise
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_from_noise_reproduces_the_probabilities(family, schedule):
    """The inverse-CDF draw of the stratified uniform grid u = (i + 0.5)/N has frequencies within 1/N of
    q(x_t | x_0) (and of q(x_{t-1} | x_t, x_0)), never a state of probability 0, and is the first state whose
    cumulative probability exceeds u; u = 0 and the largest u < 1 give states of positive probability."""
    K, T, N = 3, 6, 1000
    ref = Ref(family, schedule, K, T)
    guide = FAMILIES[family](T, K, schedule, event_dim=1)
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N

    def check(fn, probs):
        k = guide.from_noise(fn, u[:, None]).numpy()[:, 0]
        freq = np.bincount(k, minlength=ref.S) / N
        assert np.abs(freq - probs).max() <= 1.0 / N + 1e-12
        assert (freq[probs == 0] == 0).all()
        np.testing.assert_array_equal(k, np.searchsorted(np.cumsum(probs), u.numpy(), side="right"))
        for edge in (0.0, 1.0 - 2.0**-53):  # the ends of [0, 1)
            drawn = guide.from_noise(fn, torch.full((N, 1), edge, dtype=torch.float64)).numpy()[:, 0]
            assert (probs[drawn] > 0).all()

    for t in range(1, T + 1):
        for k0 in range(K):
            x0 = grid_value(np.full((N, 1), k0), K)
            check(guide.q_xt(x0, torch.full((N,), t)), ref.marg[t, k0])
            if t == 1:
                continue
            for i in range(ref.S):
                if ref.marg[t, k0, i] > 0:
                    fn = guide.q_prev(torch.full((N, 1), i), x0, torch.full((N,), t))
                    check(fn, ref.post[t, i, k0])


# =========================================================================== ancestral sampling
@pytest.mark.parametrize("family", FAMILIES)
def test_ancestral_samples_follow_the_exact_marginal(family):
    """``chain(num_images=n)`` (Algorithm 2) draws x_0 with the frequencies of the exact p_theta(x_0)."""
    K, T, n = 3, 8, 20000
    ref, guide, model, net = build(family, "cosine", K, T, seed=7)
    px = exact_px0(ref, net.logits)
    with torch.no_grad():
        x = model.chain(num_images=n).numpy()
    k = np.rint((x + 1) * (K - 1) / 2).astype(int)
    np.testing.assert_allclose((x + 1) * (K - 1) / 2, k, atol=1e-12)  # on the grid
    index = k[:, 0] * K + k[:, 1]  # the order of ref.data()
    freq = np.bincount(index, minlength=K**D) / n
    assert np.all(np.abs(freq - px) < 4.5 * np.sqrt(px * (1 - px) / n) + 1e-12)


# =========================================================================== 7. contracts and capabilities
def test_incomplete_programs_and_missing_capabilities_are_refused_in_one_line():
    """A class without a contract method cannot be built (TypeError naming it); an operation the
    categorical model does not declare is refused (ValueError naming the model and the operation)."""

    class NoPosterior(ForwardProgram):
        @property
        def T(self):
            return 3

        def q_xt(self, x0, t):
            raise NotImplementedError

        def from_noise(self, fn, noise):
            raise NotImplementedError

    with pytest.raises(TypeError, match="NoPosterior.*q_prev") as e:
        NoPosterior()
    assert "\n" not in str(e.value) and "q_xt" not in str(e.value)

    class NoDecoder(ReverseProgram):
        @property
        def T(self):
            return 3

        def network_output(self, x_t, t):
            raise NotImplementedError

        def p_xT(self, batch, like):
            raise NotImplementedError

        def p_prev(self, x_t, t, out):
            raise NotImplementedError

        def check_data(self, x0, t=None):
            raise NotImplementedError

    with pytest.raises(TypeError, match="NoDecoder.*p_x0") as e:
        NoDecoder()
    assert "\n" not in str(e.value)

    class NoSchedule(CategoricalForwardProcess):  # a family file without its schedule_class
        pass

    with pytest.raises(TypeError, match="NoSchedule.*schedule_class"):
        NoSchedule(4, 3)

    _, _, model, _ = build("masked", "linear", 3, 4)
    for capability in ("ddim", "respace", "ode"):
        with pytest.raises(ValueError, match=f"CategoricalReverseProcess does not support {capability}") as e:
            require(model, capability)
        assert "\n" not in str(e.value)
    require(model, "progressive")  # declared

    with pytest.raises(ValueError, match="CategoricalReverseProcess does not support DDIM"):
        sampling_program(model, "ddim", steps=2)
    with pytest.raises(ValueError, match="CategoricalReverseProcess does not support ancestral sampling in 2"):
        sampling_program(model, "ancestral", steps=2)
    assert sampling_program(model, "ancestral") is model
    # the model and its forward process must agree on the levels
    with pytest.raises(ValueError, match="4 levels but the forward process 3"):
        CategoricalReverseProcess(model.eps, model.schedule, DiscretizedGaussianLikelihood(4), shape=(D,))
    # a model pairs only with guides of its own family
    check_pair(CategoricalReverseProcess, MaskedForwardProcess)
    check_pair(CategoricalReverseProcess, UniformForwardProcess)
    with pytest.raises(ValueError, match="CategoricalReverseProcess reverses a categorical .*ForwardProcess") as e:
        check_pair(CategoricalReverseProcess, ForwardProcess)
    assert "\n" not in str(e.value)


# =========================================================================== gradients and progressive coding
@pytest.mark.parametrize("family,schedule", [("masked", "cosine"), ("uniform", "linear")])
def test_gradient_of_the_bound_matches_finite_differences_of_the_reference(family, schedule):
    """The library's bound (its exact expectation over x_t) differentiated by autograd with respect to the
    network's table equals central finite differences of the numpy reference bound, and its value is the
    reference's."""
    K, T = 3, 5
    ref, guide, model, net = build(family, schedule, K, T, seed=3)
    table = net.table.detach().numpy().copy()
    total = torch.zeros(())
    for t in range(1, T + 1):
        x0, st, q, a, _ = reachable_rows(ref, t)
        x = grid_value(x0, K)
        tt = torch.full((len(q), 1), t, dtype=torch.long)
        guide_fn = protocol.FixedNoise({protocol.X_t: torch.as_tensor(st)}, given_state)(guide.per_timestep)
        terms = TermwiseELBO().terms(model.per_timestep, guide_fn, x, tt)
        pair = terms[protocol.X_PREV].value + terms[protocol.X_0].value
        total = total + (torch.as_tensor(q) * pair).sum()
        if t == T:
            total = total + (torch.as_tensor(q) * terms[protocol.X_T].value).sum()
    (grad,) = torch.autograd.grad(total, net.table)
    assert float(total.detach()) == pytest.approx(reference_bound(ref, table).sum(), rel=1e-11)
    rng = np.random.default_rng(0)
    h = 1e-5
    for _ in range(12):
        t, n, j = rng.integers(1, T + 1), rng.integers(ref.S**D), rng.integers(D * K)
        up, down = table.copy(), table.copy()
        up[t, n, j] += h
        down[t, n, j] -= h
        fd = (reference_bound(ref, up).sum() - reference_bound(ref, down).sum()) / (2 * h)
        assert float(grad[t, n, j]) == pytest.approx(fd, rel=1e-5, abs=1e-8)
    assert float(grad.abs().sum()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluator_terms_and_progressive_coding_from_given_noise(family):
    """With given uniform noise the evaluator's x_t is the inverse-CDF state (numpy searchsorted on
    q(x_t | x_0)), its L_t column is the reference term at that state, and its progressive-coding squared
    error is that of E_{p_theta}[x_0 | x_t] = sum_k p_theta(x_0 = v_k | x_t) v_k, on the 0..255 scale."""
    K, T = 3, 6
    ref, guide, model, net = build(family, "linear", K, T, seed=13)
    data = ref.data()
    N = len(data)
    U = torch.rand((1, N, T, D), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ds = evaluate.bound(model, guide, grid_value(data, K), noise=U).bound
    v = -1.0 + 2.0 * np.arange(K) / (K - 1)
    for b, x in enumerate(data):
        for t in range(1, T + 1):
            state = np.array(
                [
                    np.searchsorted(np.cumsum(ref.marg[t, x[d]]), float(U[0, b, t - 1, d]), side="right")
                    for d in range(D)
                ]
            )
            n = int(sum(state[d] * ref.S ** (D - 1 - d) for d in range(D)))
            logits = net.logits(t, n)
            assert float(ds["L"].values[0, b, t - 1]) == pytest.approx(
                pair_term(ref, logits, x, state, t), rel=1e-10, abs=1e-12
            )
            x0_hat = ref.x0_probs(logits, state, t) @ v
            err = np.mean(((x0_hat - v[x]) * 127.5) ** 2)
            assert float(ds["sq_error"].values[0, b, t - 1]) == pytest.approx(err, rel=1e-10, abs=1e-9)


# =========================================================================== image-shaped data
class ImageNet(nn.Module):
    """The flat table network for image-shaped data (C, H, W) with C H W = D: reads (B, 2C, H, W) (values,
    then mask indicators) and returns (B, C K, H, W), channel c's K logits contiguous."""

    def __init__(self, flat: TableNet, shape):
        super().__init__()
        self.flat, self.shape = flat, tuple(shape)

    def forward(self, h, t):
        B, (C, H, W), K = h.shape[0], self.shape, self.flat.K
        out = self.flat(torch.cat([h[:, :C].reshape(B, D), h[:, C:].reshape(B, D)], 1), t)  # (B, D K)
        return out.reshape(B, C, H, W, K).permute(0, 1, 4, 2, 3).reshape(B, C * K, H, W)


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 1, 1)])
@pytest.mark.parametrize("family", FAMILIES)
def test_image_shaped_data_give_the_flat_bound(family, shape):
    """Data of shape (1, 1, 2) (two pixels) or (2, 1, 1) (two channels) with the same logits per element:
    the bound per datum is the numpy reference's (the logits' channel/pixel layout is read as documented)."""
    K, T = 3, 5
    ref, _, _, net = build(family, "cosine", K, T, seed=17)
    guide = FAMILIES[family](T, K, "cosine", event_dim=3)
    model = CategoricalReverseProcess(ImageNet(net, shape), guide.schedule, likelihood(K), shape=shape)
    want = reference_bound(ref, net.table.detach().numpy())
    np.testing.assert_allclose(exact_library_bound(ref, model, guide), want, rtol=1e-10, atol=1e-12)


def test_integer_images_are_accepted_by_the_importance_weighted_bound_and_bound_of():
    """8-bit style (integer level) input reaches a categorical model on the model's own device."""
    from pyro_ddpm.adapters import bound_of

    class Zeros(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, h, t):
            return torch.zeros(h.shape[0], 6, dtype=torch.float64) + self.w

    g = MaskedForwardProcess(4, 3, "linear", event_dim=1)
    m = CategoricalReverseProcess(Zeros(), g.schedule, DiscretizedGaussianLikelihood(3), shape=(2,))
    x = torch.tensor([[0, 2]], dtype=torch.uint8)
    iw = importance_weighted(m, g, x, particles=2)
    # uniform logits: every element costs log 3 whatever the path (the masked process reveals each once)
    np.testing.assert_allclose(np.asarray(iw["nats"]), [2 * math.log(3.0)], rtol=1e-6)  # the images become float32
    # the per-timestep bound draws x_t afresh at each t: 2 log 3 only on average over its noise draws
    _, summary = bound_of((m, g), x, levels=3, draws=256)
    np.testing.assert_allclose(summary["total"]["nats_per_image"], 2 * math.log(3.0), rtol=0.05)


@pytest.mark.parametrize("guide_class", [MaskedForwardProcess, UniformForwardProcess])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_evidence_and_mixture_equal_the_sums_over_every_x0(guide_class, schedule):
    """A family's O(K) evidence and mixture equal the base class's sums over k of marginal / posterior."""
    from pyro_ddpm.discrete import CategoricalSchedule

    K, T = 4, 7
    s = guide_class(T, K, schedule, 1).schedule
    states = torch.arange(s.states)
    x_t = states.repeat_interleave(T).reshape(-1, 1)  # every state at every t
    t = torch.arange(1, T + 1).repeat(s.states)
    log_p0 = torch.log_softmax(torch.randn(len(t), 1, K, generator=torch.Generator().manual_seed(3)).double(), -1)
    ev = s.evidence(x_t, t, torch.float64)
    np.testing.assert_allclose(ev.numpy(), CategoricalSchedule.evidence(s, x_t, t, torch.float64).numpy(), atol=1e-15)
    possible = (ev.sum(-1) > 0).reshape(-1)  # drop x_t that no x_0 leads to (an unmasked element at t = T)
    x_t, t, log_p0, ev = x_t[possible], t[possible], log_p0[possible], ev[possible]
    log_p0 = torch.log_softmax(log_p0 + ev.log(), -1)  # a prediction consistent with x_t, as the model's is
    ours, sums = s.mixture(x_t, log_p0, t).exp(), CategoricalSchedule.mixture(s, x_t, log_p0, t).exp()
    np.testing.assert_allclose(ours.numpy(), sums.numpy(), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(ours.sum(-1).numpy(), 1.0, rtol=1e-12)


def test_simple_on_the_uniform_process_is_refused_before_anything_is_written(tmp_path):
    from pyro_ddpm.train import TrainConfig, train

    config = TrainConfig(data="digits", model="CategoricalReverseProcess", guide="UniformForwardProcess")
    config.objective = "simple"
    with pytest.raises(ValueError, match="objective 'simple' needs a forward process whose terms are weighted"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
