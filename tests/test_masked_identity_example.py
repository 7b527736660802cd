"""The example ``masked_bound_is_weighted_ce.py``: the masked program's traced L_{t-1} is w_t times the
cross-entropy over the masked pixels, in value and in gradient, for both masking schedules (float64, to
1e-10 relative); the simple objective's weights make each term CE / T; and a wrong weight is caught.

The weights are checked against w_t written out here from the schedules' formulas (linear: 1/t), not
read from the library.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from pyro_ddpm import data

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "masked_bound_is_weighted_ce.py"
TOL = 1e-10


def load_example():
    spec = importlib.util.spec_from_file_location("example_masked_bound_is_weighted_ce", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ex():
    return load_example()


@pytest.fixture(scope="module")
def quick(ex, tmp_path_factory):
    out = tmp_path_factory.mktemp("masked_identity") / "identity.json"
    return out, ex.main(["--quick", "--out", str(out)])


def reference_w(schedule: str, T: int, t: int) -> float:
    """w_t = (alpha_{t-1} - alpha_t) / (1 - alpha_t) from the schedule's formula, in plain floats."""

    def alpha(s):
        if s == 0:
            return 1.0
        if s == T:
            return 0.0
        return 1.0 - s / T if schedule == "linear" else 1.0 - math.cos(0.5 * math.pi * (1.0 - s / T))

    return (alpha(t - 1) - alpha(t)) / (1.0 - alpha(t))


def test_quick_run_shows_the_identity_for_both_schedules(quick):
    out, result = quick
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["T"] == 10 and result["dtype"] == "float64" and result["levels"] == 17
    assert set(result["schedules"]) == {"linear", "cosine"}
    for name, r in result["schedules"].items():
        steps = [row["t"] for row in r["rows"]]
        assert steps[0] == 1 and steps[-1] == 10
        for row in r["rows"]:
            w = reference_w(name, 10, row["t"])
            assert row["w"] == pytest.approx(w, rel=1e-12)
            assert row["lambda"] == pytest.approx(1.0 / (10 * w), rel=1e-12)
            assert row["masked"] > 0 and row["ce"] > 0  # 4 images x 64 pixels: every row has masked pixels
            assert row["max_rel_diff"] < TOL and row["simple_max_rel_diff"] < TOL
            assert row["L"] == pytest.approx(row["w_ce"], rel=TOL)
        assert r["rows"][-1]["masked"] == 4 * 64  # alpha_T = 0: everything is masked at t = T
        if name == "linear":
            assert [row["w"] for row in r["rows"]] == pytest.approx([1.0 / t for t in steps], rel=1e-12)
        assert r["max_rel_diff"] < TOL and r["max_abs_diff"] < 1e-12
        assert r["L_T_max_abs"] == 0.0 and r["lambda_T_w_minus_1"] < 1e-14
        g = r["gradients"]
        for objective in ("elbo", "simple"):
            assert g[objective]["grad_norm"] > 0
            assert g[objective]["grad_rel_diff"] < TOL and g[objective]["loss_rel_diff"] < TOL


def test_the_cross_entropy_is_read_off_the_networks_own_softmax(ex):
    """For a masked pixel q(x_t = M | x_0 = v_k) is the same for every k, so p_theta(x_0 | x_t) is the softmax of
    the network's logits alone; an unmasked pixel adds nothing."""
    model, guide = ex.build(10, "cosine", ch=8, seed=3)
    x0 = data.load("digits").test[:3].double()
    t = torch.tensor([[2, 6], [4, 9], [1, 10]])
    noise = ex.draw_noise(3, 2, seed=5)
    ce, masked, x_t = ex.masked_cross_entropy(model, guide, x0, t, noise)
    with torch.no_grad():
        tf = t.reshape(-1)
        is_m = x_t == 17
        h = torch.cat([torch.where(is_m, 0.0, x_t.clamp(max=16).double() / 8 - 1), is_m.double()], dim=1)
        logits = model.eps(h, tf).reshape(6, 17, 8, 8)
        k = ((x0.repeat_interleave(2, 0)[:, 0] + 1) * 8).round().long()
        log_p = torch.log_softmax(logits, dim=1).gather(1, k.unsqueeze(1)).squeeze(1)
        want = -(log_p * is_m[:, 0]).flatten(1).sum(-1)
    assert torch.equal(masked, is_m.flatten(1).sum(-1))
    torch.testing.assert_close(ce.detach(), want, rtol=1e-12, atol=0)
    assert bool((masked > 0).all())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_wrong_weight_breaks_the_identity(ex, schedule):
    """With 1/T in place of w_t the traced terms and their gradients no longer match the cross-entropy form."""
    T = 10
    model, guide = ex.build(T, schedule, ch=8, seed=1)
    x0 = data.load("digits").test[:4].double()
    t = torch.tensor([1, 2, 5, 9]).expand(4, -1)
    noise = ex.draw_noise(4, 4, seed=2)
    right = ex.compare(model, guide, x0, t, noise)
    assert ex.max_diffs(right["L"], right["rhs"], right["masked"] > 0)[1] < TOL
    wrong_weight = torch.full((T + 1,), 1.0 / T, dtype=torch.float64)
    wrong = ex.compare(model, guide, x0, t, noise, weight=wrong_weight)
    assert ex.max_diffs(wrong["L"], wrong["rhs"], wrong["masked"] > 0)[1] > 0.5
    g = ex.gradients(model, guide, x0, t, noise, weight=wrong_weight)
    assert g["elbo"]["grad_rel_diff"] > 0.1 and g["elbo"]["loss_rel_diff"] > 0.1
    assert g["simple"]["grad_rel_diff"] < TOL  # the simple form does not involve w_t


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--T", "1"], "--T must be at least 2"),
        (["--images", "0"], "--images must be positive"),
        (["--quick", "--timesteps", "0", "3"], r"--timesteps must lie in 1..T = 1..10, got \[0\]"),
        (["--quick", "--schedules", "geometric"], "unknown masking schedules"),
    ],
)
def test_bad_arguments_raise_one_clear_error(ex, argv, match, tmp_path):
    out = tmp_path / "identity.json"
    with pytest.raises(ValueError, match=match):
        ex.main(argv + ["--out", str(out)])
    assert not any(tmp_path.iterdir())
