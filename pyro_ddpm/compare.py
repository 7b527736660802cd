"""The comparison of Ho et al. (2020, Tables 1 and 2), run and reported: which objective gives the best
likelihood, and which the best samples, for each parameterization.

Each *arm* (:data:`pyro_ddpm.presets.ARMS`: a model program, an objective, a timestep sampler, ...)
trains the same network preset from the same seed, and each trained model (its EMA weights) is
measured the same way:

- likelihood: the bound on the test split in bits/dim, term by term (L_T, the rate L_1..L_{T-1} and its
  split by decades of t, the distortion L_0), by :func:`pyro_ddpm.evaluate.bound`;
- samples: ancestral samples (Algorithm 2) scored by :func:`pyro_ddpm.metrics.sample_quality`: Frechet
  and kernel distances in the feature space of a small classifier trained on the data set's training
  split, and the Inception-Score analogue with the same classifier (NOT comparable to Inception FID);
- baselines beside them, as rows of the same table: independent per-pixel categorical distributions fit
  on the training split (:func:`pyro_ddpm.metrics.pixel_categorical_baseline`), the Pyro VAE of
  :mod:`pyro_ddpm.vae` (negative ELBO and importance-weighted bound), and the sample scores of as many
  test images as there are samples against the training split (the floor the metrics can reach at that
  size).

With several seeds each number is the mean over seeds with the standard error over seeds; with one
seed the standard errors are over test images (bound) and over sample subsets (sample metrics).

Output in ``out``: one run directory per arm and seed (checkpoint, metrics.jsonl, the bound's
netCDF/JSON, samples.pt), ``comparison.md`` (the table), ``comparison.json`` (every number),
``terms.png`` (L_t of every arm), ``samples.png`` (grids side by side), ``training.png`` (the bound's
estimate and the loss against the step). A run that is unfinished (interrupted) is resumed, and one
that finished is measured again without retraining, so re-running the same command continues.

On the CPU the runs train side by side, one process each, and are then measured one after another
with every thread (:func:`~pyro_ddpm.runtime.parallelism` says why and how many); an interrupt stops every training run
where it can resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from pyro_ddpm import data as datasets
from pyro_ddpm import presets, stats
from pyro_ddpm.checkpoint import FILENAME, TrainState
from pyro_ddpm.evaluate import bound, format_summary, save, summarize
from pyro_ddpm.figures import (
    comparison_terms_figure,
    endpoints_text,
    grid_figure,
    new_figure,
    save_figure,
    term_summary,
    total_text,
)
from pyro_ddpm.files import atomic_write, check_directory
from pyro_ddpm.hooks import read_metrics
from pyro_ddpm.metrics import pixel_categorical_baseline, sample_quality
from pyro_ddpm.runtime import parallelism, run_side_by_side, torch_threads
from pyro_ddpm.sample import MIN_TILE, PAD, PAD_COLOR, image_grid, sample
from pyro_ddpm.train import RESUMABLE, TrainConfig, train
from pyro_ddpm.vae import train_vae, vae_bounds

DEFAULT_SAMPLES = 256  # samples per model for the sample scores, unless the data set's settings say
VAE_SETTINGS = dict(steps=3000, z_dim=16, hidden=256, particles=256, draws=16)


def default_samples(data: str) -> int:
    """Samples per model for the sample scores: the data set's compare setting, else :data:`DEFAULT_SAMPLES`."""
    return presets.settings(data).get("compare", {}).get("samples", DEFAULT_SAMPLES)


def compare_config(given: dict) -> tuple[TrainConfig, dict, tuple]:
    """The base config of a comparison on ``given["data"]``: the data set's training settings
    (:data:`pyro_ddpm.presets.DATASETS`) with the user's settings on top; and its arms and default arms."""
    name = given.get("data", TrainConfig.data)
    entry = presets.settings(name).get("compare", {})
    base = dict(entry.get("train", {}))
    net_overrides = {**base.pop("net_overrides", {}), **given.get("net_overrides", {})}
    config = TrainConfig(**{**base, **given, "net_overrides": net_overrides, "data": name})
    arms = {arm: _under(settings, given) for arm, settings in entry.get("arms", presets.ARMS).items()}
    return config, arms, tuple(entry.get("default_arms", presets.DEFAULT_ARMS))


def _under(arm: dict, given: dict) -> dict:
    """An arm's own settings under the user's: a setting the user gave applies to every arm (the network
    overrides are merged key by key, the user's winning)."""
    out = {k: v for k, v in arm.items() if k not in given or k == "net_overrides"}
    if "net_overrides" in out:
        out["net_overrides"] = {**out["net_overrides"], **given.get("net_overrides", {})}
    return out


def arm_config(base: TrainConfig, arm: dict, seed: int) -> TrainConfig:
    """The base settings with the arm's on top (its network overrides merged into the base's)."""
    arm = dict(arm)
    if "net_overrides" in arm:
        arm["net_overrides"] = {**base.net_overrides, **arm["net_overrides"]}
    return dataclasses.replace(base, **arm, seed=seed)


def describe_arm(arm: dict) -> str:
    """The arm's settings in a table cell: model, objective, timesteps, then any other setting it makes."""
    first = [str(arm[k]) for k in ("model", "objective", "timesteps") if k in arm]
    rest = []
    for k, v in arm.items():
        if k in ("model", "objective", "timesteps"):
            continue
        if isinstance(v, dict):
            rest += [f"{kk} {vv}" for kk, vv in v.items()]
        else:
            rest.append(f"{k} {v}")
    return ", ".join(first + rest)


def _to_train(config: TrainConfig, run: Path) -> bool:
    """Whether ``run`` still needs training: not when it finished with these settings; a run trained
    with other settings is refused."""
    path = run / FILENAME
    if not path.exists():
        return True
    state = TrainState.load(path)
    state.resume_config(dataclasses.asdict(config), RESUMABLE)  # refuses a run with other settings
    return state.step < config.steps


def _trained(config: TrainConfig, run: Path, progress: bool) -> Path:
    """Train ``run``, resume it when it is unfinished, or reuse it when it is finished (same settings)."""
    if _to_train(config, run):
        train(config, run, progress=progress, resume=(run / FILENAME).exists())
    return run / FILENAME


def measure(
    run: Path,
    dataset,
    *,
    num_samples: int,
    draws: int,
    max_batch: int,
    limit: int | None,
    device: str,
    seed: int,
    progress: bool,
) -> dict:
    """The bound, the sample scores and the training curve of one trained run (written into ``run``)."""
    state = TrainState.load(run)
    model, guide = state.build(device=device)
    x = dataset.test[:limit].to(device)
    idata = bound(model, guide, x, draws=draws, max_batch=max_batch, seed=seed, progress=progress)
    summary = summarize(idata)
    save(idata, summary, run, "bound_test")
    torch.manual_seed(seed)
    samples = sample(model, num_samples, progress=progress).cpu()
    atomic_write(run / "samples.pt", lambda f: torch.save(samples, f))
    try:
        quality = sample_quality(samples, dataset)
    except ValueError as e:  # e.g. a data set without class labels: no classifier to score samples with
        quality = {"unavailable": str(e)}
    return {
        "bound": summary,
        "quality": quality,
        "training": read_metrics(run / "metrics.jsonl"),
        "idata": idata,
        "samples": samples,
    }


def _train_task(config: TrainConfig, run: Path) -> None:
    """One run in a training process of :func:`~pyro_ddpm.runtime.run_side_by_side`, one that needs training
    (:func:`_to_train`)."""
    train(config, run, progress=False, resume=(run / FILENAME).exists())


def _mean_se_over(values: list[float], ses: list[float]) -> tuple[float, float]:
    """Mean and standard error: over seeds when there are several, else the one run's own s.e."""
    if len(values) == 1:
        return float(values[0]), float(ses[0])
    return stats.mean_se(np.asarray(values, dtype=np.float64))


BOUND_COLUMNS = (
    ("total", "total bits/dim"),
    ("prior_L_T", "L_T"),
    ("rate_L_1_to_L_T-1", "rate L_1..L_{T-1}"),
    ("distortion_L_0", "distortion L_0"),
)
QUALITY_COLUMNS = (("fd", "FD (classifier)"), ("kid", "KID (classifier)"), ("score", "classifier score"))


def aggregate(results: dict) -> dict:
    """``{arm: {column: (mean, se)}}`` over the seeds of each arm (bands of the rate included)."""
    table = {}
    for arm, runs in results.items():
        row = {}
        unit = runs[0]["bound"].get("unit", "bits_per_dim")  # nats_per_dim for continuous data
        se = "se" if unit == "bits_per_dim" else f"se_{unit}"
        for key, _ in BOUND_COLUMNS:
            row[key] = _mean_se_over([r["bound"][key][unit] for r in runs], [r["bound"][key][se] for r in runs])
        for band in runs[0]["bound"].get("bands", {}):
            row[band] = _mean_se_over(
                [r["bound"]["bands"][band]["bits_per_dim"] for r in runs],
                [r["bound"]["bands"][band]["se"] for r in runs],
            )
        for key, _ in QUALITY_COLUMNS:
            if "unavailable" not in runs[0]["quality"]:
                row[key] = _mean_se_over([r["quality"][key] for r in runs], [r["quality"][f"{key}_se"] for r in runs])
        table[arm] = row
    return table


def _cell(v) -> str:
    if v is None:
        return ""
    digits = 4 if abs(v[0]) < 10 else 1  # bits/dim to 4 decimals; FD/KID-sized numbers to 1
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def markdown(
    table: dict,
    baselines: dict,
    reference: dict | None,
    seeds: int,
    dataset_name: str,
    arms: dict,
    unit: str = "bits/dim",
) -> str:
    """The comparison table: one row per arm, the baselines' rows, and the metrics' floor."""
    bands = [k for k in next(iter(table.values())) if k.startswith("L_") and ".." in k]
    columns = (
        [("total", f"total {unit}")] + [(b, b) for b in bands] + list(BOUND_COLUMNS[1:2]) + list(BOUND_COLUMNS[3:])
    )
    if reference is not None:
        columns += list(QUALITY_COLUMNS)
    head = ["arm", "settings"] + [name for _, name in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in table.items():
        cells = " | ".join(_cell(row.get(k)) for k, _ in columns)
        lines.append(f"| {arm} | {describe_arm(arms[arm])} | {cells} |")
    for label, value in baselines.items():
        lines.append(f"| {label} | | " + " | ".join([_cell(value)] + [""] * (len(columns) - 1)) + " |")
    if reference is not None:
        cells = [""] * (len(columns) - len(QUALITY_COLUMNS)) + [
            _cell((reference[k], reference[f"{k}_se"])) for k, _ in QUALITY_COLUMNS
        ]
        label = f"{reference['n']} test images vs the train split (the metrics' floor at that many samples)"
        lines.append(f"| {label} | | " + " | ".join(cells) + " |")
    note = [
        f"{dataset_name}, {seeds} seed(s) per arm; ± is the standard error "
        + (
            "over seeds."
            if seeds > 1
            else "over test images (bounds)"
            + ("; FD bootstrap, KID jackknife, score over splits." if reference is not None else ".")
        )
    ]
    if bands:
        note.append(f"{', '.join(bands)}: the rate split by decades of t ({unit}).")
    if reference is not None:
        note.append(
            "FD, KID and the classifier score are computed in the feature space of a small classifier "
            "trained on this data set's training split: not comparable to Inception FID/KID/IS."
        )
    return "\n".join(lines) + "\n\n" + " ".join(note) + "\n"


def _term_rows(results: dict) -> tuple[dict, dict]:
    """Per arm, the rate by decades of t (``{arm: {band: (mean, se)}}``) and a legend label with the
    total, L_0 and L_T: the mean over seeds with the s.e. over seeds (one seed: over test images)."""
    bands, labels = {}, {}
    for arm, runs in results.items():
        summaries = [term_summary(r["idata"].bound) for r in runs]
        row = {
            name: _mean_se_over([s[name][0] for s in summaries], [s[name][1] for s in summaries])
            for name in summaries[0]
        }
        bands[arm] = {name: v for name, v in row.items() if ".." in name}
        labels[arm] = f"{arm}: total {total_text(*row['total'])}, {endpoints_text(row)}"
    return bands, labels


def _samples_figure(first: dict, seeds: int):
    """The first 64 samples of each arm as image grids shown pixel for pixel (tiles of at least
    :data:`~pyro_ddpm.sample.MIN_TILE` pixels), or all of them as 2-D points."""
    x0 = next(iter(first.values()))["samples"]
    if x0.dim() == 4:
        scale = max(1, math.ceil(MIN_TILE / max(x0.shape[-2:])))
        grids = {
            arm: image_grid(
                r["samples"][:64], ncol=8, scale=scale, pad=PAD, pad_value=PAD_COLOR if x0.shape[1] in (1, 3) else 1.0
            )
            for arm, r in first.items()
        }
        shown = min(64, len(x0))
        what = f"{shown} of {len(x0)} samples per arm" + (", first seed" if seeds > 1 else "")
        return grid_figure(grids, title=what)
    fig, axes = new_figure(1, len(first), size=(3.6 * len(first), 3.9))
    for ax, (arm, r) in zip(axes[0], first.items()):
        x = r["samples"]
        ax.scatter(*x[:, :2].T, s=3)
        ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), aspect="equal", title=f"{arm} ({len(x)} samples)")
    return fig


def figures(results: dict, out: Path) -> dict[str, Path]:
    """``terms.png`` (L_t of each arm on log-log axes beside the rate by decades of t; total, L_0 and L_T
    in the legend), ``samples.png`` (each arm's samples) and ``training.png`` (the bound's estimate and
    the objective against the step) in ``out``. With several seeds the curves and samples are each arm's
    first seed's, the bars and the legend the mean over seeds."""
    first = {arm: runs[0] for arm, runs in results.items()}
    seeds = len(next(iter(results.values())))
    bands, labels = _term_rows(results)
    note = "first seed; bars and legend: mean ± s.e. over seeds" if seeds > 1 else ""
    fig = comparison_terms_figure({arm: r["idata"].bound for arm, r in first.items()}, bands, labels, note)
    paths = {"terms": save_figure(fig, out / "terms.png")}
    paths["samples"] = save_figure(_samples_figure(first, seeds), out / "samples.png")

    fig, ((ax_b, ax_l),) = new_figure(1, 2, size=(10, 3.6))
    for k, (arm, runs) in enumerate(results.items()):
        for j, r in enumerate(runs):
            c = r["training"]
            label = arm if j == 0 else None
            ax_b.plot(c["step"], c["bound_bits_per_dim"], color=f"C{k}", lw=1, label=label)
            ax_l.plot(c["step"], c["loss_per_image"], color=f"C{k}", lw=1, label=label)
    ax_b.set(xlabel="step", ylabel="bound estimate, window mean (bits/dim)", title="the bound while training")
    ax_l.set(xlabel="step", ylabel="objective per image (nats)", yscale="symlog", title="the training objective")
    ax_b.legend(fontsize=8)
    paths["training"] = save_figure(fig, out / "training.png")
    return paths


def vae_rows(dataset, x: torch.Tensor, seed: int, settings: dict | None = None, log=print) -> dict:
    """The Pyro VAE of :mod:`pyro_ddpm.vae` trained on the same training split: its negative ELBO and its
    importance-weighted bound on the test images ``x`` (bits/dim, mean ± s.e. over images)."""
    s = dict(VAE_SETTINGS, **(settings or {}))
    vae, _ = train_vae(dataset, s["steps"], s["z_dim"], hidden=s["hidden"], seed=seed)
    b = vae_bounds(vae, x, s["draws"], s["particles"])
    to_bpd = stats.unit_scale(dataset.dims)
    rows = {}
    for key, label in (
        ("elbo", f"Pyro VAE (z {s['z_dim']}), negative ELBO"),
        ("iwae", f"Pyro VAE (z {s['z_dim']}), IWAE-{s['particles']}"),
    ):
        rows[label] = stats.mean_se(b[key] * to_bpd)
    log("VAE: " + ", ".join(f"{k} {m:.4f} ± {e:.4f}" for k, (m, e) in rows.items()))
    return rows


def compare(
    base: TrainConfig,
    out: str | Path,
    arms: dict | None = None,
    seeds=(0,),
    *,
    num_samples: int | None = None,
    draws: int = 1,
    max_batch: int = 1024,
    limit: int | None = None,
    progress: bool = True,
    vae: bool = True,
    vae_settings: dict | None = None,
    jobs: int | None = None,
    log=print,
) -> dict:
    """Train, measure and report every arm and seed; return the aggregated table, the files written
    (``paths``) and the run folders (``runs``, arm by arm, seed by seed).

    :param arms: ``{name: TrainConfig overrides}`` (default: the data set's default arms).
    :param num_samples: samples per model for the sample scores (default: the data set's ``samples``
        in :data:`pyro_ddpm.presets.DATASETS`, else :data:`DEFAULT_SAMPLES`).
    :param jobs: how many runs (arm and seed) train side by side, each in its own process (None:
        :func:`~pyro_ddpm.runtime.parallelism`'s choice); they are then measured one after another. A run's
        numbers do not depend on which process trained it, only on its torch thread count.
    """
    out = check_directory(out, "comparison folder")
    if arms is None:
        _, all_arms, default = compare_config({"data": base.data})
        arms = {a: all_arms[a] for a in default}
    seeds = list(seeds)
    num_samples = default_samples(base.data) if num_samples is None else num_samples
    if not seeds or not arms:
        raise ValueError(f"compare: give at least one {'seed' if not seeds else 'arm'}")
    if num_samples < 2:
        raise ValueError(f"compare: need at least 2 samples per model, got {num_samples}")
    configs = {(a, s): arm_config(base, arms[a], s) for a in arms for s in seeds}
    for config in configs.values():
        config.check()  # every arm's settings are refused before the first one trains
    dataset = datasets.load(base.data)
    jobs, threads, measure_threads = parallelism(base.device, base.threads, len(configs), jobs)
    runs = {key: out / (key[0] if len(seeds) == 1 else f"{key[0]}-seed{key[1]}") for key in configs}
    if jobs > 1:
        _train_side_by_side(configs, runs, jobs, threads, log)
    settings = dict(num_samples=num_samples, draws=draws, max_batch=max_batch, limit=limit, device=base.device)
    done = {}
    with torch_threads(measure_threads):
        for (arm, seed), run in runs.items():
            if jobs == 1:  # one process: each run is trained just before it is measured
                _trained(configs[arm, seed], run, progress)
            r = done[arm, seed] = measure(run, dataset, seed=seed, progress=progress, **settings)
            log(f"\n== arm {arm}, seed {seed} ==\n{format_summary(r['bound'])}\n{_scores(r)}")
    results = {a: [done[a, s] for s in seeds] for a in arms}
    baselines = _baselines(dataset, limit, seeds[0], vae, vae_settings, log)
    return {**report(results, baselines, base, dataset, arms, seeds, out, log), "runs": list(runs.values())}


def _train_side_by_side(configs: dict, runs: dict, jobs: int, threads: int, log) -> None:
    """Train the runs that need it, ``jobs`` processes of ``threads`` torch threads at a time; a run
    trained with other settings is refused here, before any trains; finished runs are kept."""
    todo = {f"{a}, seed {s}": (configs[a, s], run) for (a, s), run in runs.items() if _to_train(configs[a, s], run)}
    if todo:
        processes = min(jobs, len(todo))
        log(f"training {len(todo)} runs in {processes} processes of {threads} torch thread(s) each")
        run_side_by_side(_train_task, todo, processes, threads, log)


def _scores(result: dict) -> str:
    q = result["quality"]
    scores = q.get("unavailable") or ", ".join(f"{k} {q[k]:.4g} ± {q[k + '_se']:.2g}" for k, _ in QUALITY_COLUMNS)
    return f"sample scores: {scores}"


def _baselines(dataset, limit: int | None, seed: int, vae: bool, vae_settings: dict | None, log) -> dict:
    """The rows beside the arms: per-pixel categoricals fit on the training split and, for images, the Pyro
    VAE (discrete data only): ``{"record": the per-pixel baseline's record, "rows": {label: (mean, se)}}``,
    or ``{}`` for continuous data."""
    if dataset.continuous:
        return {}
    test = dataset.test[:limit]
    baseline = pixel_categorical_baseline(dataset.train, test, dataset.levels)
    rows = {"per-pixel categorical (fit on train)": (baseline["bits_per_dim"], baseline["se"])}
    if vae and len(dataset.shape) == 3:
        rows.update(vae_rows(dataset, test, seed, vae_settings, log))
    return {"record": baseline, "rows": rows}


def report(results: dict, baselines: dict, base: TrainConfig, dataset, arms: dict, seeds: list, out: Path, log) -> dict:
    """The table (``comparison.md``), every number (``comparison.json``) and the figures of measured runs."""
    table = aggregate(results)
    rows = baselines.get("rows", {})
    reference = next(iter(results.values()))[0]["quality"].get("data_vs_data")
    unit = "nats/dim" if dataset.continuous else "bits/dim"
    text = markdown(table, rows, reference, len(seeds), dataset.name, arms, unit)
    log("\n" + text)
    paths = figures(results, out)
    record = {
        "data": dataset.name,
        "seeds": seeds,
        "arms": arms,
        "config": dataclasses.asdict(base),
        "table": {a: {k: {"mean": v[0], "se": v[1]} for k, v in row.items()} for a, row in table.items()},
        "baselines": {k: {"mean": v[0], "se": v[1]} for k, v in rows.items()},
        "pixel_categorical_baseline": baselines.get("record"),
        "test_vs_train_quality": reference,
        "runs": {a: [{k: r[k] for k in ("bound", "quality", "training")} for r in runs] for a, runs in results.items()},
    }
    paths["markdown"] = atomic_write(out / "comparison.md", lambda f: f.write(text.encode()))
    paths["json"] = atomic_write(
        out / "comparison.json", lambda f: f.write(json.dumps(record, indent=2, default=float).encode())
    )
    return {"table": table, "baselines": rows, "reference": reference, "paths": paths, "markdown": text}
