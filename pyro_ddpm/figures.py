"""Figures of the bound computed by :func:`pyro_ddpm.evaluate.bound`, written atomically as PNG.

- :func:`plot_terms`: the terms L_t against t in bits/dim, with a band of +-2 standard errors over images.
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
    return ds["L"].values.mean(0) / (int(ds.attrs["dims"]) * math.log(2))


def _mean_se(per_image: np.ndarray):
    n = per_image.shape[0]
    se = per_image.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(per_image.shape[1:])
    return per_image.mean(0), se


def _total(ds) -> str:
    mean, se = _mean_se(_bits_per_dim(ds).sum(-1, keepdims=True))
    return f"{mean[0]:.4f} ± {se[0]:.4f}"


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


def plot_terms(idata, path) -> Path:
    """L_t against t in bits/dim (log scale), mean over images with +-2 s.e.; L_0 and L_T marked."""
    fig, ((ax,),) = new_figure()
    titles = []
    for k, (label, ds) in enumerate(_runs(idata).items()):
        color = f"C{k}"
        mean, se = _mean_se(_bits_per_dim(ds))
        t, T = np.arange(len(mean)), int(ds.attrs["T"])
        floor = mean[mean > 0].min() / 10 if (mean > 0).any() else 1e-12  # keep the band on the log axis
        lo, hi = np.maximum(mean - 2 * se, floor), mean + 2 * se
        ax.plot(t[1:T], mean[1:T], color=color, lw=1, label=_name(label, "L_t, 0 < t < T"))
        ax.fill_between(t[1:T], lo[1:T], hi[1:T], color=color, alpha=0.25, lw=0)
        for s, marker, name in ((0, "s", "L_0"), (T, "^", "L_T")):
            ax.errorbar(
                s,
                mean[s],
                yerr=[[max(mean[s] - lo[s], 0)], [2 * se[s]]],
                fmt=marker,
                color=color,
                mfc="white",
                ms=7,
                label=_name(label, f"{name} = {mean[s]:.2e}"),
            )
        titles.append(_name(label, f"total {_total(ds)} bits/dim"))
    ax.set(yscale="log", xlabel="t", ylabel="L_t (bits/dim), band ±2 s.e. over images")
    ax.set_title("\n".join(titles), fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


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
