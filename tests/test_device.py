"""``--device auto``: the default everywhere, resolved once (CUDA when torch sees a GPU, else the CPU),
stated when a run starts and stored in the checkpoint; explicit devices work as before."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pyro_ddpm import cli
from pyro_ddpm.checkpoint import TrainState
from pyro_ddpm.compare import compare_config
from pyro_ddpm.runtime import check_device, device_line, resolve_device
from pyro_ddpm.train import TrainConfig, train

TINY = dict(data="digits", T=10, batch_size=16, net_overrides={"ch": 8}, warmup=2, lr=1e-3, log_every=1)
TINY_CLI = ["--data", "digits", "--T", "10", "--ch", "8", "--batch-size", "16", "--lr", "1e-3", "--threads", "1"]


@pytest.fixture
def gpu(monkeypatch):
    """torch claims a CUDA device (nothing runs on it: only the resolution is looked at)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the resolution on a machine without CUDA")
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == "cpu"
    assert TrainConfig().device == "cpu" and TrainConfig(device="auto").device == "cpu"
    assert device_line("cpu") == "pyro-ddpm: training on cpu (no CUDA device found)"


def test_auto_is_cuda_when_torch_sees_a_gpu(gpu, monkeypatch):
    assert resolve_device("auto") == "cuda"
    config = TrainConfig(**TINY)
    assert config.device == "cuda"  # resolved once, at construction: what the checkpoint would store
    assert dataclasses.asdict(config)["device"] == "cuda"
    assert dataclasses.replace(config, steps=5).device == "cuda"
    config.device = "auto"  # set after construction: check() resolves it
    config.check()
    assert config.device == "cuda"
    assert device_line("cuda") == "pyro-ddpm: training on cuda"
    # under torchrun each process takes its own GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == "cuda:1"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", None])
def test_other_devices_are_kept_as_given(device, gpu):
    assert resolve_device(device) == device
    assert TrainConfig(device=device).device == device


def test_the_default_is_auto_in_every_subcommand(gpu):
    """With a GPU in sight every subcommand's default device resolves to it; --device cpu forces the CPU."""
    assert {f.name: f.default for f in dataclasses.fields(TrainConfig)}["device"] == "auto"
    for command in ("evaluate", "sample"):
        args = cli.parser().parse_args([command, "run"])
        assert getattr(args, "device", "auto") == "auto" and resolve_device("auto") == "cuda"  # not given: auto
        assert cli.parser().parse_args([command, "run", "--device", "cpu"]).device == "cpu"
    assert cli.Sampling().device == "auto"
    args = cli.parser().parse_args(["train", "--out", "run"])
    assert not hasattr(args, "device")  # not given: TrainConfig's default applies
    assert TrainConfig(**cli._given(args)).device == "cuda"
    forced = cli.parser().parse_args(["train", "--out", "run", "--device", "cpu"])
    assert TrainConfig(**cli._given(forced)).device == "cpu"
    args = cli.parser().parse_args(["compare", "--out", "run"])
    assert compare_config(cli._given(args))[0].device == "cuda"
    args = cli.parser().parse_args(["compare", "--out", "run", "--device", "cpu"])
    assert compare_config(cli._given(args))[0].device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the resolved device is the CPU only without CUDA")
def test_the_checkpoint_stores_the_resolved_device(tmp_path, capsys):
    path = train(TrainConfig(steps=2, device="auto", **TINY), tmp_path / "api", progress=False)
    assert TrainState.load(path).config["device"] == "cpu"
    # the command line, default device, with progress: the run's first line names the device
    run = tmp_path / "cli"
    assert cli.main(["train", *TINY_CLI, "--steps", "2", "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "pyro-ddpm: training on cpu (no CUDA device found)"
    assert TrainState.load(run).config["device"] == "cpu"
    # device is resumable: --device auto on resume resolves on this machine
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "3", "--device", "auto", "--no-progress"]) == 0
    state = TrainState.load(run)
    assert state.step == 3 and state.config["device"] == "cpu"


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "unknown device 'tpu': "),
        ("meta", "device 'meta' is not supported (use cpu or cuda[:N])"),
        ("cuda:7", "device 'cuda:7' requested but "),
    ],
)
def test_a_bad_device_is_one_line(tmp_path, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_device(device)
    out = tmp_path / "run"
    for argv in (
        ["train", *TINY_CLI, "--steps", "2", "--no-progress", "--out", str(out)],
        ["sample", str(out), "--no-progress"],
        ["evaluate", str(out), "--no-progress"],
    ):
        assert cli.main([*argv, "--device", device]) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert captured.out == "" and len(lines) == 1 and lines[0].startswith("pyro-ddpm: error: " + message), lines
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fall-back to the CPU of a run stored on CUDA")
def test_a_resume_without_device_resolves_auto_on_this_machine(tmp_path):
    """A run whose checkpoint says it trained on a GPU resumes on a CPU-only machine without --device (and
    under torchrun each process would resolve its own GPU rather than the one rank 0 stored)."""
    run = tmp_path / "run"
    assert cli.main(["train", *TINY_CLI, "--steps", "2", "--no-progress", "--out", str(run)]) == 0
    state = TrainState.load(run)
    state.config["device"] = "cuda:0"  # as written by rank 0 of a GPU run
    (run / "checkpoint.pt").write_bytes(state.to_bytes())
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0
    state = TrainState.load(run)
    assert state.step == 3 and state.config["device"] == "cpu"
