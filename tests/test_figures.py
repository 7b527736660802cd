"""The figures of pyro_ddpm.figures drawn from real (tiny) bounds, and the evaluate-speed benchmark end to end."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from pyro_ddpm import figures
from pyro_ddpm.evaluate import bound, summarize
from pyro_ddpm.guides import ForwardProcess
from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.nets import MLP, UNet
from pyro_ddpm.schedule import Schedule

PLOTS = {"terms": figures.plot_terms, "rate_distortion": figures.plot_rate_distortion, "strip": figures.plot_strip}
KINDS = ("gray", "rgb", "flat")


def tiny_bound(kind: str, seed: int = 0, T: int = 5, n: int = 3):
    """The bound of a randomly initialised tiny network on grid data: (1, 4, 4), (3, 4, 4) or (2,)."""
    torch.manual_seed(seed)
    if kind == "flat":
        net, levels, std = MLP(dim=2, hidden=16, depth=2, temb_dim=8), 256, 0.3
    else:
        net = UNet(
            resolution=4,
            in_channels=1 if kind == "gray" else 3,
            ch=8,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(2,),
            dropout=0.0,
            groups=4,
        )
        levels, std = 17, 0.15
    with torch.no_grad():  # the nets zero-initialise their output layers: make eps_theta non-trivial
        for p in net.parameters():
            torch.nn.init.normal_(p, std=std)
    schedule = Schedule.linear(T)
    model = ReverseProcess(net, schedule, "large", DiscretizedGaussianLikelihood(levels))
    x0 = torch.randint(0, levels, (n, *net.shape)).float() * (2.0 / (levels - 1)) - 1.0
    return bound(model, ForwardProcess(schedule, event_dim=len(net.shape)), x0)


@pytest.fixture(scope="module")
def idatas():
    return {kind: tiny_bound(kind) for kind in KINDS}


def read_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert 100 <= img.shape[0] <= 2000 and 100 <= img.shape[1] <= 3000, img.shape
    assert img[..., :3].std() > 0  # something was drawn
    return img


def no_temporaries(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PLOTS)
def test_each_figure_is_a_png(idatas, tmp_path, kind, name):
    path = PLOTS[name](idatas[kind], tmp_path / "sub" / f"{name}.png")
    assert path == tmp_path / "sub" / f"{name}.png"
    read_png(path)
    assert no_temporaries(path.parent)


@pytest.mark.parametrize("kind", KINDS)
def test_save_all_writes_the_three_figures(idatas, tmp_path, kind):
    paths = figures.save_all(idatas[kind], tmp_path, stem="run")
    assert paths == {name: tmp_path / f"run_{name}.png" for name in PLOTS}
    for path in paths.values():
        read_png(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"run_{name}.png" for name in PLOTS)


@pytest.mark.parametrize("kind", ("gray", "flat"))
@pytest.mark.parametrize("name", PLOTS)
def test_overlaying_two_labelled_runs(idatas, tmp_path, kind, name):
    other = tiny_bound(kind, seed=1)
    single = read_png(PLOTS[name](idatas[kind], tmp_path / "single.png"))
    both = read_png(PLOTS[name]({"elbo": idatas[kind], "simple": other}, tmp_path / "both.png"))
    assert single.shape != both.shape or not np.array_equal(single, both)


def test_save_all_overlay(idatas, tmp_path):
    paths = figures.save_all({"elbo": idatas["gray"], "simple": tiny_bound("gray", seed=1)}, tmp_path)
    assert sorted(paths) == sorted(PLOTS)
    for path in paths.values():
        read_png(path)


def test_rate_distortion_curve_matches_summary(idatas):
    ds = idatas["gray"].bound
    steps, rate, rmse = figures.progressive_coding_curve(ds)
    assert steps.tolist() == [5, 4, 3, 2, 1]
    rows = {r["step"]: r for r in summarize(idatas["gray"])["progressive_coding"]}
    for s, r, d in zip(steps, rate, rmse):
        if s in rows:
            assert r == pytest.approx(rows[s]["rate_bits_per_dim"], rel=1e-12)
            assert d == pytest.approx(rows[s]["distortion_rmse"], rel=1e-12)
    assert np.all(np.diff(rate) >= 0)  # the rate only grows along the reverse process


def test_strip_rejects_unshowable_shapes(tmp_path):
    with pytest.raises(ValueError, match="cannot show"):
        figures._display(np.zeros((2, 4, 4)))
