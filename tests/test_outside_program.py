"""A program written outside the library (tests/outside_grid.py) goes through the whole CLI unchanged.

It has a network output that depends on the data (K logits per pixel), a variance rule of its own and a
restricted objective set; the library learns all three from the class, and a checkpoint naming it loads
only when the user says so (--trust-code).
"""

from __future__ import annotations

import json

import torch

from pyro_ddpm import checkpoint, data
from pyro_ddpm.cli import main

NAME = "outside_grid:OutsideGridModel"
TINY = [
    "--data",
    "digits",
    "--T",
    "10",
    "--ch",
    "8",
    "--batch-size",
    "16",
    "--log-every",
    "2",
    "--no-progress",
    "--model",
    NAME,
]


def test_an_outside_program_trains_resumes_evaluates_and_samples(tmp_path, capsys):
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["train", *TINY, "--steps", "6", "--warmup", "2", "--out", str(straight)]) == 0
    assert main(["train", *TINY, "--steps", "3", "--warmup", "2", "--out", str(run)]) == 0
    state = checkpoint.load(run)
    assert state.programs["model"] == {"class": NAME, "config": {"variance": "certainty", "shape": [1, 8, 8]}}
    assert state.programs["network"]["config"]["out_channels"] == 17  # K logits per pixel, from the data
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-progress"]) == 2  # names a class
    assert "--trust-code" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-progress", "--trust-code"]) == 0
    a, b = checkpoint.load(run).weights["net"], checkpoint.load(straight).weights["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()

    # a checkpoint naming an unregistered class imports nothing unless the user says so
    assert main(["evaluate", str(run), "--limit", "4", "--no-progress", "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{NAME}'" in err and "--trust-code" in err
    for flags in ([], ["--clip-denoised"]):
        assert (
            main(["evaluate", str(run), "--limit", "4", "--no-progress", "--no-figures", "--trust-code", *flags]) == 0
        )
        summary = json.loads((run / "bound_test.json").read_text())
        assert summary["model"] == NAME and summary["clip_denoised"] == bool(flags)
        assert 0 < summary["total"]["bits_per_dim"] < 20
    assert main(["sample", str(run), "--n", "4", "--trust-code", "--no-progress"]) == 0
    assert (run / "samples.png").stat().st_size > 100


def test_the_class_declares_its_objectives_and_its_variance(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "2", "--objective", "simple", "--out", str(tmp_path / "a")]) == 2
    assert "does not train on objective 'simple'; it supports ['elbo']" in capsys.readouterr().err
    assert main(["train", *TINY, "--steps", "2", "--variance", "small", "--out", str(tmp_path / "b")]) == 2
    assert "has no variance 'small'; it implements ['certainty']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_reported_variance_is_the_one_the_transitions_use(tmp_path):
    import pytest

    assert main(["train", *TINY, "--steps", "2", "--out", str(tmp_path)]) == 0
    model, _ = checkpoint.load(tmp_path).build(trust_code=True)
    assert model.variance == "certainty"
    with pytest.raises(ValueError, match="certainty"):
        model.sigma2
    x_t = data.load("digits").test[:2]
    t = torch.tensor([5, 5])
    out = model.network_output(x_t, t)
    w, _ = model.weights(x_t, t, out)
    s = model.schedule
    u = 1.0 - w.amax(2)
    expected = (s.sigma2_small[5] + u * (s.sigma2_large[5] - s.sigma2_small[5])).sqrt()
    torch.testing.assert_close(model.transition(x_t, t)[1], expected.to(x_t.dtype))
