"""Figures of the bound computed by :func:`pyro_ddpm.evaluate.bound`, written atomically as PNG.

- :func:`plot_terms`: the terms L_t (0 < t < T) against t on log-log axes in bits/dim (nats/dim for
  continuous data), with a band of +-2 standard errors over images; L_0 and L_T are stated in the legend,
  not drawn, and the total in the title. :func:`comparison_terms_figure` adds the rate by decades of t as
  a bar chart per arm (the comparison's ``terms.png``), and :func:`grid_figure` shows sample grids pixel
  for pixel.
- :func:`plot_rate_distortion`: progressive coding as in the paper's Figure 5: distortion (RMSE on the
  0..255 scale, log axis) and rate (bits/dim L_T + ... + L_t) against the reverse step t, and distortion
  against rate.
- :func:`plot_strip`: the x_0 predictions of the first image along the reverse process (Figure 6).

Each accepts one ``InferenceData`` or a dict of labelled ones (e.g. ``{"elbo": a, "simple": b}``),
drawn over each other (terms, rate/distortion) or one row each (strip). The figures are drawn with
matplotlib's Agg canvas directly, so no global pyplot backend is set or needed.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from pyro_ddpm import stats
from pyro_ddpm.files import atomic_write


def _runs(idata) -> dict:
    """``{label: bound Dataset}``; a single InferenceData gets the empty label."""
    runs = idata if isinstance(idata, dict) else {"": idata}
    if not runs:
        raise ValueError("no InferenceData to plot")
    return {label: data.bound for label, data in runs.items()}


def new_figure(nrows: int = 1, ncols: int = 1, size=(6.0, 4.0)):
    """A pyplot-free Agg figure and its (nrows, ncols) axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig, path) -> Path:
    """Render ``fig`` to PNG in memory, then write it over ``path`` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def _bits_per_dim(ds) -> np.ndarray:
    """Per-image terms in bits/dim, averaged over draws: (images, T + 1), column t = L_t."""
    return stats.bits_per_dim(ds["L"].values.mean(0), int(ds.attrs["dims"]))


def _name(label: str, text: str) -> str:
    return f"{label}: {text}" if label else text


def progressive_coding_curve(ds):
    """Reverse steps t = T..1, the rate L_T + ... + L_t (bits/dim) and the distortion RMSE (0..255) there."""
    T = int(ds.attrs["T"])
    L = _bits_per_dim(ds).mean(0)
    rate = np.cumsum(L[::-1])[::-1][1:]  # rate[t - 1] = sum_{s >= t} L_s, t = 1..T
    rmse = np.sqrt(ds["sq_error"].values.mean((0, 1)))
    steps = np.arange(T, 0, -1)
    return steps, rate[steps - 1], rmse[steps - 1]


# The L_t axis reaches at most this factor below its top: 6 decades hold what the bound is made of, and a
# term below that (the grid models' L_1 is 0, their L_2 1e-11 bits/dim) is drawn off the axis and counted.
TERMS_RANGE = 1e6


def term_unit(ds) -> tuple[str, float]:
    """The bound's unit and the factor from nats per image to it: bits/dim for discrete data, nats/dim for
    continuous data (a density bound, see :func:`pyro_ddpm.evaluate.summarize`)."""
    discrete = bool(int(ds.attrs.get("discrete", 1)))
    return stats.unit_label(discrete), stats.unit_scale(int(ds.attrs["dims"]), discrete)


def term_summary(ds) -> dict[str, tuple[float, float]]:
    """``{name: (mean, s.e. over images)}`` in :func:`term_unit`'s unit: ``total``, ``L_0``, ``L_T`` and the
    rate by decades of t (``L_1..L_9``, ``L_10..L_99``, ...: :func:`pyro_ddpm.evaluate.rate_bands`)."""
    from pyro_ddpm.evaluate import rate_bands  # evaluate imports (through sample) this module

    _, scale = term_unit(ds)
    L = ds["L"].values.mean(0) * scale  # (images, T + 1)
    parts = {"total": L.sum(-1), "L_0": L[:, 0], "L_T": L[:, -1]}
    for lo, hi in rate_bands(int(ds.attrs["T"])):
        parts[f"L_{lo}..L_{hi}"] = L[:, lo : hi + 1].sum(-1)
    return {name: stats.mean_se(v) for name, v in parts.items()}


def format_value(mean: float, se: float | None = None) -> str:
    """``mean ± se`` to 3 significant digits (2 for the s.e.); an exact 0 as ``0``, no s.e. when it is NaN."""
    text = "0" if mean == 0 else f"{mean:.3g}"
    return text if se is None or not math.isfinite(se) else f"{text} ± {se:.2g}"


def total_text(mean: float, se: float) -> str:
    """A total to 4 decimals, as the summaries report it: ``mean ± se``."""
    return f"{mean:.4f}" + (f" ± {se:.4f}" if math.isfinite(se) else "")


def endpoints_text(values: dict[str, tuple[float, float]]) -> str:
    """``L_0 = m ± se, L_T = m ± se`` from a :func:`term_summary`-like dict."""
    return ", ".join(f"{name} = {format_value(*values[name])}" for name in ("L_0", "L_T"))


def draw_terms(ax, runs: dict, labels: dict[str, str] | None = None) -> str:
    """L_t for 0 < t < T of each run (``{label: bound Dataset}``) on log-log axes, t from 1 to T: the mean
    over images with a band of +-2 standard errors; returns the unit (:func:`term_unit`).

    L_0 and L_T are not drawn (L_0 can be 1e-40 where L_t is 1e-2): each curve's legend label states them,
    or ``labels[label]`` replaces it. The y-limits come from the drawn means and bands alone: from just
    below the smallest positive mean, but at most :data:`TERMS_RANGE` below the top, to just above the
    largest band edge. A mean below that floor (0 included) is drawn off the axis' bottom, and the label
    counts such steps.
    """
    curves, unit, T_max = {}, "", 2
    for label, ds in runs.items():
        unit, scale = term_unit(ds)
        mean, se = stats.mean_se(ds["L"].values.mean(0) * scale)
        se = np.nan_to_num(se)  # a single image: no band
        T = int(ds.attrs["T"])
        curves[label] = (np.arange(1, T), mean[1:T], se[1:T], mean, se)
        T_max = max(T_max, T)
    inner = np.concatenate([c[1] for c in curves.values()])
    top = max([float((c[1] + 2 * c[2]).max()) for c in curves.values() if c[1].size] + [0.0])
    positive = inner[inner > 0]
    if top <= 0:  # nothing positive to draw: any decade will do
        top = 1.0
    floor = max(float(positive.min()) if positive.size else 0.0, top / TERMS_RANGE)
    bottom, below = floor / 2, floor / 100  # values below the floor are drawn at `below`, off the axis
    for k, (label, (t, m, s, mean, se)) in enumerate(curves.items()):
        color = f"C{k}"
        hidden = int((m < floor).sum())
        lo = np.where(m - 2 * s > bottom, m - 2 * s, below)
        ax.fill_between(t, lo, m + 2 * s, color=color, alpha=0.25, lw=0)
        if labels and label in labels:
            text = labels[label]
        else:
            values = {"L_0": (mean[0], se[0]), "L_T": (mean[-1], se[-1])}
            text = f"{label or 'L_t, 0 < t < T'}; {endpoints_text(values)}"
        if hidden:
            text += f" ({hidden} of the L_t below the axis)"
        ax.plot(t, np.where(m >= floor, m, below), color=color, lw=1.2, label=text)
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(1, T_max),
        ylim=(bottom, 2 * top),
        xlabel="t (log scale)",
        ylabel=f"L_t ({unit}), band ±2 s.e. over images",
    )
    ax.grid(which="major", alpha=0.3)
    return unit


def terms_figure(idata):
    """The figure of :func:`plot_terms`."""
    runs = _runs(idata)
    fig, ((ax,),) = new_figure(size=(6.4, 4.0 + 0.2 * len(runs)))
    draw_terms(ax, runs)
    titles = [
        _name(label, f"total {total_text(*term_summary(ds)['total'])} {term_unit(ds)[0]}") for label, ds in runs.items()
    ]
    ax.set_title("\n".join(titles), fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=7)
    return fig


def plot_terms(idata, path) -> Path:
    """L_t against t for 0 < t < T on log-log axes (:func:`draw_terms`), the total in the title and L_0 and
    L_T in the legend."""
    return save_figure(terms_figure(idata), path)


def draw_bands(ax, bands: dict[str, dict[str, tuple[float, float]]], unit: str) -> None:
    """A grouped bar chart of the rate by decades of t: one group per band, one bar per arm (colour ``Ck``
    for the k-th arm, as :func:`draw_terms`), error bars +-2 s.e.; ``bands`` is ``{arm: {band: (mean, se)}}``."""
    names = list(dict.fromkeys(b for values in bands.values() for b in values))
    width = 0.8 / len(bands)
    x = np.arange(len(names))
    for k, (arm, values) in enumerate(bands.items()):
        mean = np.array([values.get(b, (np.nan, np.nan))[0] for b in names])
        se = np.array([values.get(b, (np.nan, np.nan))[1] for b in names])
        bars = ax.bar(
            x + (k - (len(bands) - 1) / 2) * width,
            mean,
            width,
            yerr=2 * np.nan_to_num(se),
            color=f"C{k}",
            capsize=2,
            error_kw=dict(lw=0.8),
            label=arm,
        )
        ax.bar_label(bars, labels=[format_value(v) for v in mean], fontsize=6, padding=2)
    ax.set_xticks(x, names)
    ax.set(xlabel="band of t", ylabel=f"rate in the band ({unit}), ±2 s.e.")
    ax.margins(y=0.12)


def comparison_terms_figure(
    runs: dict, bands: dict[str, dict[str, tuple[float, float]]], labels: dict[str, str], note: str = ""
):
    """Two panels: L_t of each arm against t (:func:`draw_terms`, ``runs`` is ``{arm: bound Dataset}``) and
    the rate by decades of t (:func:`draw_bands`); one legend for both, ``labels[arm]`` per arm (its total,
    L_0 and L_T)."""
    fig, ((ax_t, ax_b),) = new_figure(1, 2, size=(12.0, 4.4 + 0.18 * len(runs)))
    unit = draw_terms(ax_t, runs, labels)
    ax_t.set_title("L_t against t, 0 < t < T" + (f" ({note})" if note else ""), fontsize=9)
    draw_bands(ax_b, bands, unit)
    ax_b.set_title("the rate L_1..L_{T-1} by decades of t", fontsize=9)
    fig.legend(*ax_t.get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    return fig


def grid_figure(grids: dict[str, np.ndarray], title: str = "", per_row: int = 4, dpi: int = 150):
    """Image grids (arrays in [0, 1], (h, w) gray or (h, w, 3) RGB, e.g. from
    :func:`pyro_ddpm.sample.image_grid`) side by side, ``per_row`` to a row, each titled with its key and
    shown at one screen pixel per array pixel (no resampling) at ``dpi``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not grids:
        raise ValueError("no image grids to show")
    h = max(g.shape[0] for g in grids.values())
    w = max(g.shape[1] for g in grids.values())
    cols = min(per_row, len(grids))
    rows = math.ceil(len(grids) / cols)
    gap, head, top = 24, int(0.3 * dpi), int(0.35 * dpi) if title else 0  # pixels
    width, height = cols * w + (cols + 1) * gap, top + rows * (h + head) + gap
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (name, grid) in enumerate(grids.items()):
        r, c = divmod(i, cols)
        left, bottom = gap + c * (w + gap), height - top - (r + 1) * (h + head)
        ax = fig.add_axes((left / width, bottom / height, grid.shape[1] / width, grid.shape[0] / height))
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest", resample=False)
        ax.set_axis_off()
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 * top / height)
    return fig


def plot_rate_distortion(idata, path) -> Path:
    """Figure 5: distortion and rate against the reverse step t (T on the left), and distortion against rate."""
    return save_figure(rate_distortion_figure(idata), path)


def rate_distortion_figure(idata):
    """The figure of :func:`plot_rate_distortion`. The distortion axes are logarithmic: the unclipped x_0
    prediction near t = T divides by sqrt(abar_T), so its RMSE reaches thousands while the RMSE that
    matters (t near 1) is a few units."""
    fig, ((ax_d, ax_r, ax_rd),) = new_figure(1, 3, size=(14.0, 4.0))
    for k, (label, ds) in enumerate(_runs(idata).items()):
        steps, rate, rmse = progressive_coding_curve(ds)
        style = dict(color=f"C{k}", lw=1.2, label=label or None)
        ax_d.plot(steps, rmse, **style)
        ax_r.plot(steps, rate, **style)
        ax_rd.plot(rate, rmse, **style)
    for ax in (ax_d, ax_r):
        ax.set_xlabel("reverse step t")
        ax.invert_xaxis()
    ax_d.set(ylabel="distortion (RMSE, 0..255, log scale)", title="distortion", yscale="log")
    ax_r.set(ylabel="rate L_T + ... + L_t (bits/dim)", title="rate")
    ax_rd.set(
        xlabel="rate (bits/dim)", ylabel="distortion (RMSE, 0..255, log scale)", title="rate-distortion", yscale="log"
    )
    if isinstance(idata, dict):
        ax_rd.legend(fontsize=8)
    return fig


def plot_strip(idata, path) -> Path:
    """The x_0 predictions of the first image at its strip steps, then the image itself (one row per run).

    Images (C, H, W) with C = 1 or 3 (or (H, W)) are shown clipped to [-1, 1]; flat data (D,) is drawn
    as its coordinates against the step, with the true values as dashed lines.
    """
    runs = _runs(idata)
    first = next(iter(runs.values()))
    if first["x0_strip"].ndim == 1:
        fig, axes = new_figure(1, len(runs), size=(4.5 * len(runs), 3.5))
        for ax, (label, ds) in zip(axes[0], runs.items()):
            steps = ds["strip_step"].values
            for d, (pred, true) in enumerate(zip(ds["x0_hat_strip"].values.T, ds["x0_strip"].values)):
                ax.plot(steps, pred, "o-", color=f"C{d}", ms=3, label=f"coordinate {d}")
                ax.axhline(true, color=f"C{d}", ls="--", lw=0.8)
            ax.set(xlabel="reverse step t", ylabel="x0_hat (dashed: x_0)", title=label or None)
            ax.invert_xaxis()
            ax.legend(fontsize=7)
        return save_figure(fig, path)
    ncols = max(ds.sizes["strip_step"] for ds in runs.values()) + 1
    fig, axes = new_figure(len(runs), ncols, size=(1.3 * ncols, 1.5 * len(runs)))
    for row, (label, ds) in zip(axes, runs.items()):
        steps = ds["strip_step"].values
        panels = list(ds["x0_hat_strip"].values) + [ds["x0_strip"].values]
        for j, (ax, img) in enumerate(zip(row, panels)):
            ax.imshow(_display(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"t = {steps[j]}" if j < len(steps) else "x_0", fontsize=8)
        row[0].set_ylabel(label or "", fontsize=8)
        for ax in row:
            ax.set(xticks=[], yticks=[])
            ax.set_frame_on(False)
    return save_figure(fig, path)


def _display(img: np.ndarray) -> np.ndarray:
    """An image in [-1, 1] as an array imshow takes: (H, W) gray or (H, W, 3) RGB in [0, 1]."""
    x = (np.clip(img, -1, 1) + 1) / 2
    if x.ndim == 3 and x.shape[0] == 1:
        return x[0]
    if x.ndim == 3 and x.shape[0] == 3:
        return x.transpose(1, 2, 0)
    if x.ndim == 2:
        return x
    raise ValueError(f"cannot show data of shape {img.shape}: expected (1|3, H, W), (H, W) or flat (D,)")


def save_all(idata, directory, stem: str = "bound") -> dict[str, Path]:
    """Write ``{stem}_terms.png``, ``{stem}_rate_distortion.png`` and ``{stem}_strip.png`` in ``directory``."""
    directory = Path(directory)
    return {
        name: plot(idata, directory / f"{stem}_{name}.png")
        for name, plot in (("terms", plot_terms), ("rate_distortion", plot_rate_distortion), ("strip", plot_strip))
    }
