"""The ELBO-versus-L_simple comparison (Ho et al. 2020, Tables 1 and 2), run and reported.

The same network is trained from the same seed under each objective -- ``elbo`` (the bound, Eq. 5),
``simple`` (L_simple, Eq. 14) and ``hybrid`` (L_simple + 0.001 L_vlb with a learned variance, Nichol
and Dhariwal 2021) -- and each trained model (its EMA weights) is measured the same way:

- likelihood: the bound on the test split in bits/dim, term by term (L_T, the rate L_1..L_{T-1}, the
  distortion L_0), by :func:`pyro_ddpm.evaluate.bound`;
- samples: ancestral samples (Algorithm 2) scored by :func:`pyro_ddpm.metrics.sample_quality`: Frechet
  and kernel distances in the feature space of a small classifier trained on the data set's training
  split, and the Inception-Score analogue with the same classifier (NOT comparable to Inception FID);
- a trivial baseline beside them: independent per-pixel categorical distributions fit on the training
  split (:func:`pyro_ddpm.metrics.pixel_categorical_baseline`), and the test split's own sample scores
  against the training split (the floor the metrics can reach).

With several seeds each number is the mean over seeds with the standard error over seeds; with one
seed the standard errors are over test images (bound) and over sample subsets (sample metrics).

Output in ``out``: one run directory per objective and seed (checkpoint, metrics.jsonl, the bound's
netCDF/JSON, samples.pt), ``comparison.md`` (the table), ``comparison.json`` (every number),
``terms.png`` (L_t of every objective on one plot), ``samples.png`` (grids side by side),
``training.png`` (the per-batch bound estimate and loss against the step). A run whose checkpoint
already reached its step count is measured again without retraining, so an interrupted comparison
is resumed by running the same command.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from pyro_ddpm import checkpoint, data as datasets
from pyro_ddpm.train import RESUMABLE, TrainConfig, train

# Where each objective differs from the base config: the hybrid objective needs the learned variance.
OBJECTIVE_PROGRAMS = {
    "elbo": {},
    "simple": {},
    "hybrid": {"model": "LearnedVarianceReverseProcess", "variance": "learned"},
}

# Training settings per data set. digits: the CPU default, sized to run the three objectives in about a
# quarter of an hour on 2 CPU cores; its learning rate is 5x the paper's (1e-3: measured here, 1500 steps
# reach 3.53 bits/dim on 120 test images where 2000 steps at 2e-4 reach 3.87). mnist / cifar10: the paper's settings (Appendix B: T = 1000, linear 1e-4..0.02, Adam
# 2e-4, batch 128, dropout 0.1 on CIFAR-10, EMA 0.9999, 800k steps for CIFAR-10), meant for a GPU.
PRESETS = {
    "digits": dict(data="digits", steps=1500, batch_size=128, lr=1e-3),
    "mnist5k": dict(data="mnist5k", steps=20000, batch_size=128, net_overrides={"ch": 32}),
    "mnist": dict(steps=200000, batch_size=128, device="cuda", precision="bf16"),
    "cifar10": dict(steps=800000, batch_size=128, device="cuda", precision="bf16"),
}


def run_config(base: TrainConfig, objective: str, seed: int) -> TrainConfig:
    if objective not in OBJECTIVE_PROGRAMS:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVE_PROGRAMS)}")
    return dataclasses.replace(base, objective=objective, seed=seed, **OBJECTIVE_PROGRAMS[objective])


def _trained(config: TrainConfig, run: Path, progress: bool) -> Path:
    """Train ``run`` unless its checkpoint already holds this config at its final step."""
    path = run / checkpoint.FILENAME
    if path.exists():
        state = checkpoint.load(path)
        saved = dict(state["config"])
        asked = dataclasses.asdict(config)
        same = all(saved.get(k) == asked[k] for k in asked if k not in RESUMABLE)
        if not same:
            raise ValueError(f"{run} holds a run with other settings; choose another --out")
        if state["step"] >= config.steps:
            return path
        return train(config, run, progress=progress, resume=True)
    return train(config, run, progress=progress)


def _training_curve(run: Path) -> dict:
    steps, bound, loss = [], [], []
    with open(run / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            steps.append(r["step"])
            loss.append(r["loss_per_image"])
            bound.append(sum(r.get(f"{k}_bits_per_dim", float("nan")) for k in ("L_T", "rate", "L_0")))
    return {"step": steps, "bound_bits_per_dim": bound, "loss_per_image": loss}


def measure(run: Path, dataset, *, num_samples: int, draws: int, max_batch: int, limit: int | None,
            device: str, seed: int, progress: bool) -> dict:
    """The bound, the sample scores and the training curve of one trained run (written into ``run``)."""
    from pyro_ddpm.evaluate import bound, save, summarize
    from pyro_ddpm.metrics import sample_quality
    from pyro_ddpm.sample import sample

    state = checkpoint.load(run)
    model, guide = checkpoint.build(state, device=device)
    x = dataset.test[:limit].to(device)
    idata = bound(model, guide, x, draws=draws, max_batch=max_batch, seed=seed, progress=progress)
    summary = summarize(idata)
    save(idata, summary, run, "bound_test")
    torch.manual_seed(seed)
    samples = sample(model, num_samples).cpu()
    checkpoint.atomic_write(run / "samples.pt", lambda f: torch.save(samples, f))
    try:
        quality = sample_quality(samples, dataset)
    except ValueError as e:  # e.g. a data set without class labels: no classifier to score samples with
        quality = {"unavailable": str(e)}
    return {"bound": summary, "quality": quality, "training": _training_curve(run), "idata": idata,
            "samples": samples}


def _mean_se_over(values: list[float], ses: list[float]) -> tuple[float, float]:
    """Mean and standard error: over seeds when there are several, else the one run's own s.e."""
    if len(values) == 1:
        return float(values[0]), float(ses[0])
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


BOUND_COLUMNS = (("total", "total bits/dim"), ("prior_L_T", "L_T"), ("rate_L_1_to_L_T-1", "rate L_1..L_{T-1}"),
                 ("distortion_L_0", "distortion L_0"))
QUALITY_COLUMNS = (("fd", "FD (classifier)"), ("kid", "KID (classifier)"), ("score", "classifier score"))


def aggregate(results: dict) -> dict:
    """``{objective: {column: (mean, se)}}`` over the seeds of each objective."""
    table = {}
    for objective, runs in results.items():
        row = {}
        for key, _ in BOUND_COLUMNS:
            unit = runs[0]["bound"].get("unit", "bits_per_dim")  # nats_per_dim for continuous data
            se = "se" if unit == "bits_per_dim" else f"se_{unit}"
            row[key] = _mean_se_over([r["bound"][key][unit] for r in runs], [r["bound"][key][se] for r in runs])
        for key, _ in QUALITY_COLUMNS:
            if "unavailable" not in runs[0]["quality"]:
                row[key] = _mean_se_over([r["quality"][key] for r in runs], [r["quality"][f"{key}_se"] for r in runs])
        table[objective] = row
    return table


def _cell(v) -> str:
    if v is None:
        return ""
    digits = 4 if abs(v[0]) < 100 else 1
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def markdown(table: dict, baseline: dict | None, reference: dict | None, seeds: int, dataset_name: str,
             unit: str = "bits/dim") -> str:
    """The comparison table: one row per objective, the per-pixel baseline, and the metrics' floor."""
    columns = BOUND_COLUMNS + (QUALITY_COLUMNS if reference is not None else ())
    head = ["objective"] + [name.replace("bits/dim", unit) for _, name in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective, row in table.items():
        lines.append(f"| {objective} | " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |")
    if baseline is not None:
        lines.append("| per-pixel categorical (fit on train) | "
                     + " | ".join([_cell((baseline["bits_per_dim"], baseline["se"]))] + [""] * (len(columns) - 1)) + " |")
    if reference is not None:
        lines.append("| test split vs train split (the metrics' floor) | " + " | ".join(
            [""] * len(BOUND_COLUMNS) + [_cell((reference[k], reference[f"{k}_se"])) for k, _ in QUALITY_COLUMNS]) + " |")
    note = [f"{dataset_name}, {seeds} seed(s) per objective; ± is the standard error "
            + ("over seeds." if seeds > 1 else "over test images (bound)"
               + ("; FD bootstrap, KID jackknife, score over splits." if reference is not None else "."))]
    if reference is not None:
        note.append("FD, KID and the classifier score are computed in the feature space of a small classifier "
                    "trained on this data set's training split: not comparable to Inception FID/KID/IS.")
    return "\n".join(lines) + "\n\n" + " ".join(note) + "\n"


def figures(results: dict, out: Path) -> dict[str, Path]:
    from pyro_ddpm.figures import new_figure, plot_terms, save_figure
    from pyro_ddpm.sample import image_grid

    first = {objective: runs[0] for objective, runs in results.items()}
    paths = {"terms": plot_terms({o: r["idata"] for o, r in first.items()}, out / "terms.png")}

    fig, axes = new_figure(1, len(first), size=(3.2 * len(first), 3.6))
    for ax, (objective, r) in zip(axes[0], first.items()):
        x = r["samples"][:64]
        if x.dim() == 4:
            ax.imshow(image_grid(x), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.axis("off")
        else:
            ax.scatter(*x[:, :2].T, s=2)
            ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), aspect="equal")
        ax.set_title(objective)
    paths["samples"] = save_figure(fig, out / "samples.png")

    fig, ((ax_b, ax_l),) = new_figure(1, 2, size=(10, 3.6))
    for k, (objective, runs) in enumerate(results.items()):
        for j, r in enumerate(runs):
            c = r["training"]
            label = objective if j == 0 else None
            ax_b.plot(c["step"], c["bound_bits_per_dim"], color=f"C{k}", lw=1, label=label)
            ax_l.plot(c["step"], c["loss_per_image"], color=f"C{k}", lw=1, label=label)
    ax_b.set(xlabel="step", ylabel="bound estimate on the batch (bits/dim)", title="the bound while training")
    ax_l.set(xlabel="step", ylabel="objective per image (nats)", yscale="symlog", title="the training objective")
    ax_b.legend(fontsize=8)
    paths["training"] = save_figure(fig, out / "training.png")
    return paths


def compare(base: TrainConfig, out: str | Path, objectives=("elbo", "simple", "hybrid"), seeds=(0,), *,
            num_samples: int = 256, draws: int = 1, max_batch: int = 4096, limit: int | None = None,
            progress: bool = True, log=print) -> dict:
    """Train, measure and report every objective and seed; return the aggregated table and the paths."""
    from pyro_ddpm.evaluate import format_summary
    from pyro_ddpm.metrics import pixel_categorical_baseline

    out = Path(out)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("compare: give at least one seed")
    configs = {(o, s): run_config(base, o, s) for o in objectives for s in seeds}
    for config in configs.values():
        config.check()
    dataset = datasets.load(base.data)
    if num_samples < 2:
        raise ValueError(f"compare: need at least 2 samples per model, got {num_samples}")
    results = {o: [] for o in objectives}
    for (objective, seed), config in configs.items():
        run = out / (objective if len(seeds) == 1 else f"{objective}-seed{seed}")
        _trained(config, run, progress)
        r = measure(run, dataset, num_samples=num_samples, draws=draws, max_batch=max_batch, limit=limit,
                    device=base.device, seed=seed, progress=progress)
        q = r["quality"]
        scores = q.get("unavailable") or ", ".join(f"{k} {q[k]:.4g} ± {q[k + '_se']:.2g}" for k, _ in QUALITY_COLUMNS)
        log(f"\n== objective {objective}, seed {seed} ==\n{format_summary(r['bound'])}\nsample scores: {scores}")
        results[objective].append(r)

    table = aggregate(results)
    discrete = not dataset.continuous
    baseline = pixel_categorical_baseline(dataset.train, dataset.test[:limit], dataset.levels) if discrete else None
    first = next(iter(results.values()))[0]["quality"]
    reference = first.get("data_vs_data")
    text = markdown(table, baseline, reference, len(seeds), dataset.name, "bits/dim" if discrete else "nats/dim")
    log("\n" + text)
    paths = figures(results, out)
    record = {
        "data": dataset.name, "seeds": seeds, "objectives": list(objectives), "config": dataclasses.asdict(base),
        "table": {o: {k: {"mean": v[0], "se": v[1]} for k, v in row.items()} for o, row in table.items()},
        "pixel_categorical_baseline": baseline, "test_vs_train_quality": reference,
        "runs": {o: [{k: r[k] for k in ("bound", "quality", "training")} for r in runs] for o, runs in results.items()},
    }
    paths["markdown"] = checkpoint.atomic_write(out / "comparison.md", lambda f: f.write(text.encode()))
    paths["json"] = checkpoint.atomic_write(out / "comparison.json",
                                            lambda f: f.write(json.dumps(record, indent=2, default=float).encode()))
    return {"table": table, "baseline": baseline, "reference": reference, "paths": paths, "markdown": text}
