"""The trainer: exact resume (also after a kill), NaN stop, bf16, sample grids, and 2-process DDP on gloo."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_ddpm import checkpoint
from pyro_ddpm.cli import main
from pyro_ddpm.train import TrainConfig, train

TINY = dict(
    data="digits", T=10, batch_size=16, net_overrides={"ch": 8}, warmup=2, lr=1e-3, log_every=2, checkpoint_every=3
)


def _states_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def _adam_state(ckpt) -> dict:
    """{parameter name: its Adam state} from a checkpoint's optimizer state."""
    optim = ckpt.training["optim"]
    return {
        name: optim["optimizer"]["state"][i]
        for i, name in enumerate(optim["names"])
        if i in optim["optimizer"]["state"]
    }


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    straight = checkpoint.load(train(TrainConfig(steps=7, **TINY), tmp_path / "straight", progress=False))
    train(TrainConfig(steps=3, **TINY), tmp_path / "resumed", progress=False)
    resumed = checkpoint.load(train(TrainConfig(steps=7, **TINY), tmp_path / "resumed", progress=False, resume=True))
    assert resumed.step == straight.step == 7
    assert _states_equal(resumed.weights["net"], straight.weights["net"])  # dropout, data order, t, noise restored
    assert _states_equal(resumed.weights["ema"], straight.weights["ema"]) and resumed.training["ema_updates"] == 7
    straight_adam, resumed_adam = _adam_state(straight), _adam_state(resumed)
    assert straight_adam.keys() == resumed_adam.keys() and len(straight_adam) > 10
    for name, state in straight_adam.items():
        assert all(torch.equal(v, resumed_adam[name][k]) for k, v in state.items())
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 7]
    assert {"L_T_bits_per_dim", "rate_bits_per_dim", "L_0_bits_per_dim"} <= records[-1].keys()


def test_resume_refuses_a_different_configuration_and_fresh_runs_refuse_to_overwrite(tmp_path):
    train(TrainConfig(steps=2, **TINY), tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="lr = 0.001 \\(asked 0.01\\)"):
        train(TrainConfig(steps=4, **dict(TINY, lr=1e-2)), tmp_path, progress=False, resume=True)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(TrainConfig(steps=4, **TINY), tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint is at step 2"):
        train(TrainConfig(steps=1, **TINY), tmp_path, progress=False, resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import pyro.infer

    real_step, calls = pyro.infer.SVI.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 5 else real_step(self, *args, **kwargs)

    monkeypatch.setattr(pyro.infer.SVI, "step", step)
    with pytest.raises(FloatingPointError, match="nan at step 5; the last good checkpoint \\(step 3\\) is kept"):
        train(TrainConfig(steps=8, **TINY), tmp_path, progress=False)
    assert checkpoint.load(tmp_path).step == 3


def test_bf16_autocast_and_sample_grids(tmp_path):
    seen = []
    path = train(TrainConfig(steps=4, precision="bf16", sample_every=2, **TINY), tmp_path, progress=False)
    state = checkpoint.load(path)
    assert all(v.dtype == torch.float32 for v in state.weights["net"].values())  # autocast leaves the weights fp32
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_per_image"]) for r in records)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]

    # the network itself ran in bf16
    from pyro_ddpm import data
    from pyro_ddpm.train import build

    model, guide = build(TrainConfig(precision="bf16", **TINY), data.load("digits"))
    model.eps.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loc, _ = model.transition(torch.zeros(2, 1, 8, 8), torch.tensor([1, 5]))
    assert seen == [torch.bfloat16] and loc.dtype == torch.float32


CLI_TINY = [
    "--data",
    "mnist5k",
    "--T",
    "10",
    "--ch",
    "8",
    "--batch-size",
    "8",
    "--warmup",
    "2",
    "--lr",
    "1e-3",
    "--no-progress",
]


def test_mnist5k_train_kill_resume_sample(tmp_path):
    """The README's walk-through on the MNIST-5k preset: train, kill mid-run, resume, sample.

    The resumed run ends with exactly the parameters of an uninterrupted run.
    """
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert main(["train", *CLI_TINY, "--steps", "40", "--checkpoint-every", "4", "--out", str(reference)]) == 0
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyro_ddpm.cli",
            "train",
            *CLI_TINY,
            "--steps",
            "40",
            "--checkpoint-every",
            "4",
            "--out",
            str(run),
        ]
    )
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(run).step < 40  # killed mid-run; its last checkpoint is intact
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert _states_equal(checkpoint.load(run).weights["net"], checkpoint.load(reference).weights["net"])
    assert main(["sample", str(run), "--n", "4"]) == 0
    assert (run / "samples.png").stat().st_size > 500


def _torchrun(nproc: int, out: Path, steps: int):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pyro_ddpm.cli",
        "train",
        "--data",
        "digits",
        "--T",
        "10",
        "--ch",
        "8",
        "--dropout",
        "0",
        "--batch-size",
        "16",
        "--steps",
        str(steps),
        "--warmup",
        "2",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"torchrun exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return checkpoint.load(out)


def test_two_gloo_processes_stay_in_sync_and_match_one_process_with_the_same_global_batch(tmp_path):
    # Each checkpoint (here every step) checks that the ranks hold identical parameters, and raises if not.
    assert _torchrun(2, tmp_path / "sync", steps=4).training["world_size"] == 2
    # The averaged gradient of two shards is the global batch's gradient: compare Adam's first moments
    # after two steps (at step 1 only the zero-initialised output layer has a gradient). Later steps are not
    # compared: Adam's normalised update turns round-off in near-zero gradients into steps of size lr.
    one, two = _torchrun(1, tmp_path / "one", steps=2), _torchrun(2, tmp_path / "two", steps=2)
    assert one.training["world_size"] == 1 and two.training["world_size"] == 2
    two_adam = _adam_state(two)
    moments = {name: (state["exp_avg"], two_adam[name]["exp_avg"]) for name, state in _adam_state(one).items()}
    scale = max(float(g1.abs().max()) for g1, _ in moments.values())  # round-off is relative to the largest gradient
    for g1, g2 in moments.values():
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5 * scale)
    # The comparison says something for every tensor whose moments are well above the tolerance (with global
    # clipping the zero-initialised output layer's gradient dominates the first steps).
    assert sum(int(g1.abs().max() > 1e-4 * scale) for g1, _ in moments.values()) > 10
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss_per_image"] == pytest.approx(single[0]["loss_per_image"], rel=1e-5)


@pytest.mark.slow
def test_compiled_network_trains_and_keeps_parameter_names(tmp_path):
    path = train(TrainConfig(steps=3, compile=True, **TINY), tmp_path, progress=False)
    state = checkpoint.load(path)
    assert not any("_orig_mod" in k for k in state.weights["net"])  # module.compile() compiles in place
    assert all(torch.isfinite(v).all() for v in state.weights["net"].values())


def test_cifar10_folder_trains_with_flips_and_evaluates(tmp_path, monkeypatch):
    """A (fake, 10-image) CIFAR-10 folder given as a path: the cifar10 preset trains with flips, and the
    checkpoint remembers where its data came from."""
    from test_data import cifar_images, fake_cifar_dir

    from pyro_ddpm import data

    flips, real_flip = [], data.random_flip
    monkeypatch.setattr(data, "random_flip", lambda x, g: flips.append(len(x)) or real_flip(x, g))
    folder = fake_cifar_dir(tmp_path / "data", cifar_images())
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                folder,
                "--T",
                "5",
                "--ch",
                "8",
                "--batch-size",
                "4",
                "--steps",
                "3",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    state = checkpoint.load(run)
    assert state.data["name"] == "cifar10" and state.data["shape"] == [3, 32, 32]
    assert state.data["source"] and state.config["data"] == folder
    assert flips == [4, 4, 4]  # every CIFAR-10 batch is flipped at random (digits/MNIST batches are not)
    assert main(["evaluate", str(run), "--no-progress", "--no-figures"]) == 0
