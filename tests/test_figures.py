"""The figures of pyro_ddpm.figures drawn from real (tiny) bounds, and the evaluate-speed benchmark end to end."""

from __future__ import annotations

from pathlib import Path

import matplotlib.container
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


# --------------------------------------------------------------------------- the L_t figures
def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def inner_terms(ds) -> tuple[np.ndarray, np.ndarray]:
    """Mean and s.e. over images of L_t, 0 < t < T, in bits/dim."""
    per_image = ds["L"].values.mean(0)[:, 1:-1] / (int(ds.attrs["dims"]) * np.log(2))
    return per_image.mean(0), per_image.std(0, ddof=1) / np.sqrt(per_image.shape[0])


def test_terms_figure_is_log_log_from_1_to_T_and_ignores_L0_and_LT(tmp_path):
    """L_0 = 1e-40 and L_T = 0 (as for the grid models) neither drag the y-axis down nor appear on it."""
    T = 12
    idata = tiny_bound("gray", T=T)
    L = idata.bound["L"].values
    L[..., 0], L[..., -1] = 1e-40, 0.0
    L[..., 3] = 0.0  # an exactly zero L_t is drawn off the axis, and counted
    fig = figures.terms_figure(idata)
    (ax,) = fig.axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert ax.get_xlim() == (1, T)
    mean, se = inner_terms(idata.bound)
    lo, hi = ax.get_ylim()
    smallest = mean[mean > 0].min()
    assert smallest / 10 < lo < smallest  # within a decade of the smallest positive L_t, not near 1e-40
    assert hi >= (mean + 2 * se).max()
    for line in ax.get_lines():  # only 0 < t < T on the t axis
        assert line.get_xdata().min() == 1 and line.get_xdata().max() == T - 1
    (text,) = legend_texts(fig)
    s = figures.term_summary(idata.bound)
    assert f"L_0 = {figures.format_value(*s['L_0'])}" in text
    assert f"L_0 = {1e-40 / (16 * np.log(2)):.3g} ± 0" in text  # 1e-40 nats per image of 16 pixels, in bits/dim
    assert "L_T = 0 ± 0" in text and "(1 of the L_t below the axis)" in text
    assert f"total {figures.total_text(*s['total'])} bits/dim" in ax.get_title()
    read_png(figures.plot_terms(idata, tmp_path / "terms.png"))


def test_terms_axis_spans_at_most_terms_range():
    """A positive L_t far below the rest (the grid models' L_2 is 1e-11) is counted, not given the axis."""
    idata = tiny_bound("gray", T=8)
    idata.bound["L"].values[..., 2] = 1e-30
    (ax,) = figures.terms_figure(idata).axes
    mean, se = inner_terms(idata.bound)
    top = (mean + 2 * se).max()
    assert ax.get_ylim()[0] == pytest.approx(top / figures.TERMS_RANGE / 2)
    assert "(1 of the L_t below the axis)" in ax.get_lines()[0].get_label()


def comparison_results(T: int = 12, seeds: int = 2) -> dict:
    """A ``results`` dict as :func:`pyro_ddpm.compare.compare` builds it: two arms of tiny bounds."""
    results = {}
    for k, arm in enumerate(("eps-elbo", "eps-simple")):
        results[arm] = [
            {
                "idata": tiny_bound("gray", seed=10 * k + s, T=T),
                "samples": torch.rand(40, 1, 4, 4) * 2 - 1,
                "training": {"step": [1, 2], "bound_bits_per_dim": [5.0, 4.0], "loss_per_image": [9.0, 8.0]},
            }
            for s in range(seeds)
        ]
    return results


def test_comparison_terms_figure_has_log_log_terms_and_bars_by_decade():
    from pyro_ddpm import compare

    T, results = 12, comparison_results()
    bands, labels = compare._term_rows(results)
    runs = {arm: r[0]["idata"].bound for arm, r in results.items()}
    fig = figures.comparison_terms_figure(runs, bands, labels)
    ax_t, ax_b = fig.axes
    assert (ax_t.get_xscale(), ax_t.get_yscale(), ax_t.get_xlim()) == ("log", "log", (1, T))
    positive = np.concatenate([inner_terms(ds)[0] for ds in runs.values()])
    assert positive.min() / 10 < ax_t.get_ylim()[0] < positive.min()
    # one group per band of t, one bar per arm; the heights are the means over seeds
    assert [t.get_text() for t in ax_b.get_xticklabels()] == ["L_1..L_9", "L_10..L_11"]
    containers = [c for c in ax_b.containers if isinstance(c, matplotlib.container.BarContainer)]
    assert len(containers) == len(results)
    for bars, runs_of_arm in zip(containers, results.values()):
        assert len(bars) == 2
        for bar, band in zip(bars, ("L_1..L_9", "L_10..L_11")):
            expected = np.mean([figures.term_summary(r["idata"].bound)[band][0] for r in runs_of_arm])
            assert bar.get_height() == pytest.approx(expected)
    texts = legend_texts(fig)
    assert len(texts) == len(results)
    for text, arm in zip(texts, results):
        assert text.startswith(f"{arm}: total ") and "L_0 = " in text and "L_T = " in text


def test_comparison_figures_are_written(tmp_path):
    from pyro_ddpm import compare

    paths = compare.figures(comparison_results(T=5, seeds=1), tmp_path)
    assert sorted(paths) == ["samples", "terms", "training"]
    for path in paths.values():
        read_png(path)
    img = read_png(paths["samples"])
    assert img.shape[1] >= 2 * 8 * 64  # two arms of 8 columns of 4x4 images shown at 64 pixels or more
