"""``pyro-ddpm evaluate`` with a model trained elsewhere (--diffusers) and the other estimators (--ode, --particles).

The CLI's numbers are checked against the library called directly on the same images and noise: the
diffusers pipeline's bound against :func:`pyro_ddpm.adapters.bound_of`, the ODE and importance-weighted
estimates against :func:`pyro_ddpm.ode.ode_likelihood` and :func:`pyro_ddpm.importance_weighted.importance_weighted`
with the same seed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyro_ddpm import adapters, checkpoint, data
from pyro_ddpm.cli import main
from pyro_ddpm.importance_weighted import importance_weighted
from pyro_ddpm.ode import ode_likelihood

TINY = ["--T", "10", "--ch", "8", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--data", "digits", "--steps", "6", "--out", str(out), *TINY]) == 0
    return out


def test_ode_and_importance_weighted_estimates_beside_the_bound(run, capsys):
    assert (
        main(
            [
                "evaluate",
                str(run),
                "--limit",
                "6",
                "--no-progress",
                "--no-figures",
                "--ode",
                "--ode-steps",
                "20",
                "--particles",
                "4",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "probability-flow ODE" in printed and "importance-weighted, K = 4" in printed
    ode = json.loads((run / "ode_test.json").read_text())
    iw = json.loads((run / "iw_test.json").read_text())
    bound = json.loads((run / "bound_test.json").read_text())
    model, guide = checkpoint.load(run).build()
    x = data.load("digits").test[:6]
    want_ode = ode_likelihood(model, x, steps=20, seed=3)
    want_iw = importance_weighted(model, guide, x, particles=4, seed=3)
    assert ode["bits_per_dim"] == pytest.approx(want_ode["bits_per_dim"], rel=1e-9)
    assert iw["bits_per_dim"] == pytest.approx(want_iw["bits_per_dim"], rel=1e-9)
    assert ode["settings"]["steps"] == 20 and ode["settings"]["dequantize"] and ode["bound"]
    assert np.isfinite(iw["nats"]).all() and len(iw["nats"]) == 6 and bound["images"] == 6


def test_a_diffusers_pipeline_is_evaluated_like_a_run(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=10, variance_type="fixed_small")
    pipe = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(pipe)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--diffusers",
                str(pipe),
                "--data",
                "digits",
                "--limit",
                "5",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((out / "bound_test.json").read_text())
    x = data.load("digits").test[:5]
    _, want = adapters.bound_of(str(pipe), x, levels=17)
    assert summary["total"]["bits_per_dim"] == pytest.approx(want["total"]["bits_per_dim"], rel=1e-9)
    assert summary["model"].startswith("diffusers pipeline") and summary["T"] == 10
    assert {p.name for p in out.iterdir()} >= {"bound_test.nc", "bound_test.json", "bound_test_terms.png"}
    assert main(["evaluate", "--diffusers", str(pipe), "--no-progress"]) == 2
    assert "--data" in capsys.readouterr().err


def test_run_and_diffusers_are_exclusive(run, tmp_path, capsys):
    assert main(["evaluate", str(run), "--diffusers", str(tmp_path), "--data", "digits"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["evaluate"]) == 2
