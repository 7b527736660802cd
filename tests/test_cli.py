"""End to end through the ``pyro-ddpm`` command with a tiny network and small T."""

import json
import math

import matplotlib.image
import pytest
import torch

from pyro_ddpm import checkpoint
from pyro_ddpm.cli import main
from pyro_ddpm.schedule import Schedule

TINY = ["--T", "10", "--ch", "8", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--data", "digits", "--steps", "6", "--objective", "elbo", "--out", str(run), *TINY]) == 0
    return run


def test_train_writes_checkpoint_and_metrics(digits_run):
    state = checkpoint.load(digits_run)
    assert state.step == 6 and state.finished
    fp = state.data.pop("fingerprint")
    assert state.data == {"name": "digits", "shape": [1, 8, 8], "levels": 17, "source": ""}
    assert fp["count"] == 1437 and len(fp["sha256"]) == 64
    assert len(state.programs["guide"]["config"]["betas"]) == 10
    assert state.programs["model"] == {"class": "ReverseProcess", "config": {"variance": "large", "shape": [1, 8, 8]}}
    records = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and math.isfinite(records[-1]["bits_per_dim"])
    # the EMA differs from the raw weights after a few updates of a network that has learned something
    net, ema = state.weights["net"], state.weights["ema"]
    assert any(not torch.equal(net[k], ema[k]) for k in net)


def test_evaluate_prints_terms_that_add_up(digits_run, capsys):
    assert main(["evaluate", str(digits_run), "--limit", "6", "--max-batch", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for term in ("total", "prior_L_T", "rate_L_1_to_L_T-1", "distortion_L_0"):
        assert term in printed
    summary = json.loads((digits_run / "bound_test.json").read_text())
    parts = sum(summary[k]["bits_per_dim"] for k in ("prior_L_T", "rate_L_1_to_L_T-1", "distortion_L_0"))
    assert summary["total"]["bits_per_dim"] == pytest.approx(parts, rel=1e-12)
    assert summary["images"] == 6 and summary["T"] == 10
    # an untrained-ish model on 17-level data: the bound lies between 0 and a few bits per dimension
    assert 0 < summary["total"]["bits_per_dim"] < 50


def test_evaluate_options_and_outputs(digits_run, capsys):
    import arviz as az

    assert (
        main(
            [
                "evaluate",
                str(digits_run),
                "--limit",
                "4",
                "--draws",
                "2",
                "--clip-denoised",
                "--likelihood",
                "tanh_discretized_gaussian",
                "--no-figures",
                "--no-progress",
                "--T",
                "10",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "decoder TanhDiscretizedGaussianLikelihood(levels=17), clip_denoised=True" in printed
    assert "progressive coding" in printed
    idata = az.from_netcdf(digits_run / "bound_test.nc")
    assert idata.bound["L"].shape == (2, 4, 11)
    assert idata.bound.attrs["clip_denoised"] == 1
    assert idata.bound.attrs["decoder"] == "TanhDiscretizedGaussianLikelihood(levels=17)"
    summary = json.loads((digits_run / "bound_test.json").read_text())
    assert summary["draws"] == 2 and "se_noise" in summary["total"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--data", "swiss_roll"], "shape \\(2,\\), the checkpoint was trained on shape \\(1, 8, 8\\)"),
        (["--T", "20"], "T = 10"),
    ],
)
def test_evaluate_refuses_mismatches_before_computing(digits_run, capsys, argv, message):
    import re

    before = sorted(p.name for p in digits_run.iterdir())
    assert main(["evaluate", str(digits_run), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("error") == 1
    assert sorted(p.name for p in digits_run.iterdir()) == before


def test_levels_mismatch_is_named(digits_run):
    state = checkpoint.load(digits_run)
    state.check_data((1, 8, 8), 17)
    with pytest.raises(ValueError, match="256 levels per dimension, the checkpoint was trained on 17"):
        state.check_data((1, 8, 8), 256)


def test_sample_writes_png_grid(digits_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(digits_run), "--n", "9", "--out", str(out)]) == 0
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 20 and image.shape[1] > 20


def test_simple_objective_and_toy_data(tmp_path):
    run = tmp_path / "roll"
    assert (
        main(
            [
                "train",
                "--data",
                "swiss_roll",
                "--steps",
                "5",
                "--objective",
                "simple",
                "--out",
                str(run),
                "--T",
                "10",
                "--batch-size",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["sample", str(run), "--n", "50"]) == 0
    assert (run / "samples.png").stat().st_size > 1000
    assert main(["evaluate", str(run), "--limit", "4", "--no-progress"]) == 0


def test_checkpoint_with_other_schedule_is_refused(digits_run):
    state = checkpoint.load(digits_run)
    with pytest.raises(ValueError, match="T = 10.*T = 20|T = 20.*T = 10"):
        checkpoint.build(state, schedule=Schedule.linear(20))
    with pytest.raises(ValueError, match="betas differ"):
        checkpoint.build(state, schedule=Schedule.cosine(10))


def test_missing_or_corrupt_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["sample", str(tmp_path)]) == 2
    assert "not a readable pyro-ddpm checkpoint" in capsys.readouterr().err


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    checkpoint.atomic_write(path, lambda f: f.write(b"old contents"))

    def broken(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(path, broken)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_bad_training_arguments(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--steps", "0", "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "steps must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(
        ["train", "--data", "digits", "--steps", "2", "--device", "cuda:7", "--out", str(tmp_path / "r"), *TINY]
    ) == (0 if torch.cuda.device_count() > 7 else 2)
