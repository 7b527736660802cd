"""Hardening, item by item: each test reproduces what a user did and asserts the fixed behaviour.

Everything runs on tiny settings (digits, T = 10, a network with 8 base channels, batches of 16) through
the ``pyro-ddpm`` command in-process (``main(argv)``), except the signal tests, which start the command
in a subprocess. Messages, exit codes, file contents and bit-identity are checked exactly.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pyro
import pytest
import torch
from pyro.infer.util import is_validation_enabled

from pyro_ddpm import checkpoint, data, files, hooks, presets, runtime
from pyro_ddpm import train as trainer
from pyro_ddpm.checkpoint import TrainState
from pyro_ddpm.cli import main, parser
from pyro_ddpm.evaluate import bound, bound_of_network
from pyro_ddpm.sample import MIN_TILE, PAD, PAD_COLOR, save_png
from pyro_ddpm.train import TrainConfig

TINY = ["--data", "digits", "--T", "10", "--ch", "8", "--batch-size", "16", "--lr", "1e-3", "--no-progress"]
STEPS = 6


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``pyro-ddpm argv`` in-process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error(err: str) -> str:
    """The message of the single ``pyro-ddpm: error:`` line that is all of stderr."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyro-ddpm: error: "), err
    assert "Traceback" not in err
    return lines[0][len("pyro-ddpm: error: ") :]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its contents (for 'nothing was written' checks)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_cli(capsys, out: Path, *extra) -> tuple[int, str, str]:
    return cli(capsys, "train", *TINY, "--out", out, *extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (6 steps, logs every 2, checkpoints every 3). Tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("run") / "digits"
    assert (
        main(
            [
                "train",
                *TINY,
                "--steps",
                str(STEPS),
                "--log-every",
                "2",
                "--checkpoint-every",
                "3",
                "--warmup",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def crafted(run: Path, where: Path, change) -> Path:
    """A copy of ``run``'s checkpoint in the folder ``where`` with ``change(raw dict)`` applied (saved as is)."""
    raw = torch.load(run / checkpoint.FILENAME, weights_only=True)
    change(raw)
    where.mkdir(parents=True, exist_ok=True)
    torch.save(raw, where / checkpoint.FILENAME)
    return where


def interrupt_at(monkeypatch, step: int, sig=signal.SIGINT) -> None:
    """Deliver ``sig`` to this process during training step ``step`` (counted from the run's first step)."""
    real_add, calls = hooks.MetricsLog.add, []

    def add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(sig)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(hooks.MetricsLog, "add", add)


# =========================================================================== a checkpoint must not run code
EVIL_MODULE = """
import pathlib
pathlib.Path(__file__).with_name("imported").write_text("the module ran")


class Evil:
    def __init__(self, *args, **kwargs):
        pathlib.Path(__file__).with_name("called").write_text("the class ran")
"""


@pytest.fixture
def evil(tmp_path, monkeypatch) -> Path:
    """An importable module ``evil_mod`` that leaves a file behind when imported and when its class is called."""
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "evil_mod.py").write_text(EVIL_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "evil_mod", raising=False)
    return folder


def not_registered(kind: str, name: str, ckpt: Path) -> str:
    return (
        f"the {kind} class {name!r} (named by checkpoint {ckpt}) is not registered, and importing it would run "
        "its code: pass --trust-code (trust_code=True) if you trust it, or import and register it"
    )


def test_a_malicious_checkpoint_executes_nothing_and_says_so_in_one_line(run, tmp_path, evil, capsys):
    marker = tmp_path / "f"

    def popen(raw):
        raw["programs"]["likelihood"] = {
            "class": "subprocess:Popen",
            "config": {"args": ["sh", "-c", f"id > {marker}"]},
        }

    bad = crafted(run, tmp_path / "popen", popen)
    expected = not_registered("likelihood", "subprocess:Popen", bad / "checkpoint.pt")
    for argv in (["sample", bad, "--n", "2", "--no-progress"], ["evaluate", bad, "--limit", "2", "--no-progress"]):
        rc, out, err = cli(capsys, *argv)
        assert rc == 2 and one_error(err) == expected and out == ""
    with pytest.raises(ValueError) as e:
        TrainState.load(bad).build()
    assert str(e.value) == expected
    # with --trust-code the import is the user's say-so, but a class that is no pyro-ddpm program is never called
    rc, _, err = cli(capsys, "sample", bad, "--n", "2", "--no-progress", "--trust-code")
    assert rc == 2 and one_error(err) == (
        f"'subprocess:Popen' (named by checkpoint {bad / 'checkpoint.pt'}) is not a "
        "pyro-ddpm program class: it has no from_config/config (see pyro_ddpm.registry)"
    )
    time.sleep(0.2)  # a started shell would have written by now
    assert not marker.exists()
    assert sorted(p.name for p in bad.iterdir()) == ["checkpoint.pt"]

    # A module of one's own named by a checkpoint is not even imported (importing runs its top level).
    def model(raw):
        raw["programs"]["model"] = {"class": "evil_mod:Evil", "config": {}}

    other = crafted(run, tmp_path / "module", model)
    rc, _, err = cli(capsys, "sample", other, "--n", "2", "--no-progress")
    assert rc == 2 and one_error(err) == not_registered("model", "evil_mod:Evil", other / "checkpoint.pt")
    assert "evil_mod" not in sys.modules and not (evil / "imported").exists()


def test_resuming_a_checkpoint_that_names_unregistered_code_imports_nothing(run, tmp_path, evil, capsys):
    def model(raw):
        raw["config"]["model"] = "evil_mod:Evil"
        raw["config"]["steps"] = STEPS + 2
        raw["finished"] = False

    bad = crafted(run, tmp_path / "resume", model)
    rc, _, err = cli(capsys, "train", "--out", bad, "--resume", "--no-progress")
    assert rc == 2 and one_error(err) == not_registered("model", "evil_mod:Evil", bad / "checkpoint.pt")
    assert "evil_mod" not in sys.modules and not (evil / "imported").exists()
    with pytest.raises(ValueError, match="is not registered, and importing it would run its code"):
        trainer.train(
            TrainConfig(**{**{f: None for f in TrainConfig.__dataclass_fields__}, "steps": STEPS + 2}),
            bad,
            progress=False,
            resume=True,
        )
    assert "evil_mod" not in sys.modules


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"variance": "large", "shape": [1, 8, 8], "eps": "x"},
            "config keys ['eps'] are objects the caller provides, not stored data",
        ),
        ({"variance": "large", "shape": [1, 8, 8], "command": "id"}, "unknown config keys ['command']"),
        (
            {"variance": "large", "shape": torch.tensor([1, 8, 8])},
            "only plain data (numbers, strings, lists, dicts) is allowed, got Tensor",
        ),
    ],
)
def test_stored_arguments_are_plain_data_checked_against_the_class_schema(run, tmp_path, capsys, config, message):
    def model(raw):
        raw["programs"]["model"] = {"class": "ReverseProcess", "config": config}

    bad = crafted(run, tmp_path / "schema", model)
    rc, _, err = cli(capsys, "sample", bad, "--n", "2", "--no-progress")
    assert rc == 2 and message in one_error(err) and f"checkpoint {bad / 'checkpoint.pt'}" in err


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_cifar_batches_are_unpickled_as_plain_data_only(tmp_path):
    from test_data import batch_bytes, cifar_images, fake_cifar_dir

    folder = fake_cifar_dir(tmp_path / "cifar", cifar_images())
    marker = tmp_path / "pwned"
    batch = os.path.join(folder, "data_batch_3")
    with open(batch, "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f)
    with pytest.raises(ValueError) as e:
        data.load(folder)
    assert str(e.value) == (
        f"CIFAR-10 batch {batch} is not a plain-data pickle: it names posix.system, which is not "
        "plain data (numpy arrays, lists, dicts, bytes, str): refused, nothing was run"
    )
    assert not marker.exists()
    # what real batches hold loads, whichever protocol and numpy module path wrote it
    images = cifar_images()
    for protocol in (2, 5):
        rows = images["data_batch_3"].reshape(2, 3072)
        raw = pickle.dumps(
            {b"batch_label": b"x", b"labels": [0, 1], b"data": rows, b"filenames": [b"a", b"b"]}, protocol=protocol
        )
        if protocol == 2:  # a batch pickled under numpy 1 names numpy.core
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        with open(batch, "wb") as f:
            f.write(raw)
        assert torch.equal(data.load(folder).train[4:6], data.load(fake_cifar_dir(tmp_path / "ok", images)).train[4:6])
    assert batch_bytes  # the fakes' own writer (test_data) is what the other tests read


# =========================================================================== resume does what was asked, or refuses
def test_resume_keeps_the_stored_checkpoint_and_log_intervals(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train_cli(capsys, out, "--steps", "4", "--checkpoint-every", "3", "--log-every", "2")[0] == 0
    snapshots, real = [], TrainState.to_bytes
    monkeypatch.setattr(TrainState, "to_bytes", lambda self: snapshots.append(self.step) or real(self))
    rc, _, err = cli(capsys, "train", "--out", out, "--resume", "--steps", "8", "--no-progress")
    assert rc == 0 and err == ""
    assert snapshots == [6, 8]  # every 3 steps and at the end, as stored
    assert [r["step"] for r in records(out)] == [2, 4, 6, 8]
    stored = TrainState.load(out).config
    assert (stored["checkpoint_every"], stored["log_every"], stored["steps"]) == (3, 2, 8)
    # set again, they apply
    snapshots.clear()
    rc, _, _ = cli(
        capsys,
        "train",
        "--out",
        out,
        "--resume",
        "--steps",
        "10",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
    )
    assert rc == 0 and snapshots == [9, 10] and [r["step"] for r in records(out)][-2:] == [9, 10]


@pytest.mark.parametrize(
    "flags, difference",
    [
        (["--lr", "0.5"], "lr = 0.001 (asked 0.5)"),
        (["--objective", "simple"], "objective = 'elbo' (asked 'simple')"),
        (["--data", "two_moons"], "data = 'digits' (asked 'two_moons')"),
        (["--ch", "32"], "net_overrides.ch = 8 (asked 32)"),
        (["--T", "100"], "T = 10 (asked 100)"),
        (["--schedule", "cosine"], "schedule = 'linear' (asked 'cosine')"),
    ],
)
def test_resume_refuses_changed_settings_naming_stored_and_asked_values(run, capsys, flags, difference):
    before = tree(run)
    rc, out, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "8", "--no-progress", *flags)
    assert rc == 2 and out == ""
    assert one_error(err) == (
        "cannot resume: the run was trained with different settings: "
        + difference
        + "; only steps, device, log_every, sample_every, checkpoint_every, validate, threads may change"
    )
    assert tree(run) == before


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, EMA, optimizer state and logged losses."""
    sa, sb = TrainState.load(a), TrainState.load(b)
    assert sa.step == sb.step and sa.config == sb.config
    for key in ("net", "ema", "guide"):
        assert sa.weights[key].keys() == sb.weights[key].keys()
        assert all(torch.equal(v, sb.weights[key][k]) for k, v in sa.weights[key].items()), key
    oa, ob = sa.training["optim"]["optimizer"]["state"], sb.training["optim"]["optimizer"]["state"]
    assert oa.keys() == ob.keys() and len(oa) > 10
    assert all(torch.equal(v, ob[i][k]) for i in oa for k, v in oa[i].items())
    assert sa.training["optim"]["scheduler"] == sb.training["optim"]["scheduler"]
    la = {r["step"]: r["loss_per_image"] for r in records(a)}
    lb = {r["step"]: r["loss_per_image"] for r in records(b)}
    assert all(la[s] == lb[s] for s in la.keys() & lb.keys() if s % 2 == 0)


def test_half_then_resumed_to_more_steps_is_bit_identical_to_the_straight_run(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_cli(capsys, straight, "--steps", "8", "--warmup", "3", "--log-every", "2")[0] == 0
    assert train_cli(capsys, resumed, "--steps", "4", "--warmup", "3", "--log-every", "2")[0] == 0
    assert cli(capsys, "train", "--out", resumed, "--resume", "--steps", "8", "--no-progress")[0] == 0
    _same_run(straight, resumed)


def test_the_stored_default_warmup_is_kept_when_steps_are_raised(tmp_path, capsys):
    """20 steps store the default warm-up 2 (steps // 10); resuming to 40 keeps 2 (40 // 10 = 4 would differ)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_cli(capsys, resumed, "--steps", "20", "--log-every", "10", "--checkpoint-every", "20")[0] == 0
    assert TrainState.load(resumed).config["warmup"] == 2
    assert cli(capsys, "train", "--out", resumed, "--resume", "--steps", "40", "--no-progress")[0] == 0
    assert TrainState.load(resumed).config["warmup"] == 2
    assert (
        train_cli(capsys, straight, "--steps", "40", "--warmup", "2", "--log-every", "10", "--checkpoint-every", "20")[
            0
        ]
        == 0
    )
    _same_run(straight, resumed)


def test_changed_data_under_the_same_path_is_refused_on_resume(tmp_path, capsys):
    from test_data import fake_mnist

    folder, out = tmp_path / "mnist", tmp_path / "run"
    fake_mnist(folder, n_train=5, n_test=3, seed=0)
    argv = ["--T", "5", "--ch", "8", "--batch-size", "4", "--no-progress"]
    assert cli(capsys, "train", "--data", folder, *argv, "--steps", "2", "--out", out)[0] == 0
    stored = TrainState.load(out).data["fingerprint"]
    fake_mnist(folder, n_train=5, n_test=3, seed=1)  # same path, same count, other pixels
    now = checkpoint.fingerprint(data.load(str(folder)).train)
    before = tree(out)
    rc, _, err = cli(capsys, "train", "--out", out, "--resume", "--steps", "4", "--no-progress")
    assert rc == 2 and one_error(err) == (
        f"cannot resume: the training data changed since the checkpoint (5 images, sha256 {stored['sha256'][:12]}...; "
        f"now 5 images, sha256 {now['sha256'][:12]}...)"
    )
    assert tree(out) == before


def test_a_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_not(run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    expected = (
        f"the run directory {out} is in use by another pyro-ddpm process (PID {os.getpid()}); wait for it to "
        "finish or choose another --out"
    )
    with files.RunLock(out):  # another writer holds the directory (flock: per open file, so this process counts)
        rc, _, err = train_cli(capsys, out, "--steps", "2")
        assert rc == 2 and one_error(err) == expected
        assert sorted(p.name for p in out.iterdir()) == [files.LOCK_NAME]
    # The holder is gone: its lock file (with a dead PID) is stale, and the next run takes it.
    (out / files.LOCK_NAME).write_text("999999999\n")
    assert train_cli(capsys, out, "--steps", "2")[0] == 0
    assert (out / files.LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with files.RunLock(out):  # a resume is refused the same way
        rc, _, err = cli(capsys, "train", "--out", out, "--resume", "--steps", "4", "--no-progress")
        assert rc == 2 and one_error(err) == expected


def test_stale_temporaries_of_interrupted_saves_are_removed_on_start_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pt.k3j4h5g6.tmp", out / ".metrics.jsonl.abc123_x.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    (out / "notes.tmp").write_text("the user's own file")
    assert train_cli(capsys, out, "--steps", "2", "--sample-every", "2")[0] == 0
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").exists()
    stale = [out / ".checkpoint.pt.zzzzzz99.tmp", out / "samples" / ".step_0000002.png.q1w2e3r4.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    assert cli(capsys, "train", "--out", out, "--resume", "--steps", "3", "--no-progress")[0] == 0
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").exists()
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        [".pyro-ddpm.lock", "checkpoint.pt", "metrics.jsonl", "notes.tmp", "samples", "step_0000002.png"]
    )


class Killed(BaseException):
    """Stands for kill -9: nothing in the trainer handles it."""


def test_metrics_get_no_duplicate_row_after_a_kill_and_resume(tmp_path, capsys, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    argv = ["--steps", "8", "--log-every", "1", "--checkpoint-every", "2", "--warmup", "2"]
    assert train_cli(capsys, straight, *argv)[0] == 0
    real_flush = hooks.MetricsLog.flush

    def flush(self, step, *args):
        record = real_flush(self, step, *args)
        if step == 5:
            raise Killed  # after writing row 5; the last checkpoint on disk is step 4's
        return record

    monkeypatch.setattr(hooks.MetricsLog, "flush", flush)
    with pytest.raises(Killed):
        main(["train", *TINY, *argv, "--out", str(killed)])
    monkeypatch.undo()
    capsys.readouterr()
    assert TrainState.load(killed).step == 4 and [r["step"] for r in records(killed)] == [1, 2, 3, 4, 5]
    # an unfinished run says so when sampled or evaluated
    note = (
        f"pyro-ddpm: note: {killed / 'checkpoint.pt'} is at step 4 of 8: the run is not finished (still training, "
        "or interrupted)"
    )
    rc, _, err = cli(capsys, "sample", killed, "--n", "2", "--no-progress", "--out", tmp_path / "s.png")
    assert rc == 0 and err.splitlines() == [note]
    rc, _, err = cli(
        capsys, "evaluate", killed, "--limit", "2", "--no-progress", "--no-figures", "--out", tmp_path / "ev"
    )
    assert rc == 0 and err.splitlines() == [note]
    assert cli(capsys, "train", "--out", killed, "--resume", "--no-progress")[0] == 0
    rows = records(killed)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss_per_image"] for r in rows] == [r["loss_per_image"] for r in records(straight)]


def test_a_diverging_loss_stops_and_the_kept_checkpoint_holds_no_exploding_loss(tmp_path, capsys, monkeypatch):
    import pyro.infer

    real_step, calls = pyro.infer.SVI.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        loss = real_step(self, *args, **kwargs)
        return loss * 1e9 if len(calls) == 5 else loss

    monkeypatch.setattr(pyro.infer.SVI, "step", step)
    out = tmp_path / "run"
    rc, _, err = train_cli(capsys, out, "--steps", "8", "--checkpoint-every", "2")
    message = one_error(err)
    assert rc == 2 and re.fullmatch(
        r"training stopped: the loss diverged at step 5 \(\S+ per image, running median \S+\); "
        r"the last good checkpoint "
        rf"\(step 2\) is kept at {re.escape(str(out / 'checkpoint.pt'))} \(lower --lr\?\)",
        message,
    ), message
    # step 4's parameters gave the exploding loss of step 5: its checkpoint was never written
    state = TrainState.load(out)
    losses = state.training["losses"]
    assert state.step == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    median = float(np.median(losses))
    assert all(abs(v - median) <= hooks.DIVERGENCE_FACTOR * max(abs(median), 1.0) for v in losses)


def test_a_nan_right_after_a_checkpoint_step_keeps_no_checkpoint_of_those_weights(tmp_path, capsys, monkeypatch):
    import pyro.infer

    real_step, calls = pyro.infer.SVI.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real_step(self, *args, **kwargs)

    monkeypatch.setattr(pyro.infer.SVI, "step", step)
    out = tmp_path / "run"
    rc, _, err = train_cli(capsys, out, "--steps", "8", "--checkpoint-every", "2", "--log-every", "1")
    assert rc == 2 and one_error(err) == "training stopped: the loss became nan at step 3; no checkpoint was written"
    assert not (out / "checkpoint.pt").exists() and [r["step"] for r in records(out)] == [1, 2]


def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    from torch.optim.swa_utils import AveragedModel

    real, calls = AveragedModel.update_parameters, []

    def update(self, model):
        calls.append(1)
        if len(calls) == 2:  # the update of step 2 broke a weight
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return real(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", update)
    out = tmp_path / "run"
    rc, _, err = train_cli(capsys, out, "--steps", "8", "--checkpoint-every", "2")
    assert (
        rc == 2
        and one_error(err)
        == "training stopped: the network weights became non-finite at step 2; no checkpoint was written"
    )
    assert not (out / "checkpoint.pt").exists()


def test_sample_and_evaluate_report_non_finite_network_outputs_in_one_line(run, tmp_path, capsys):
    def nan_weights(raw):
        for key in ("net", "ema"):
            raw["weights"][key]["conv_out.weight"] = torch.full_like(
                raw["weights"][key]["conv_out.weight"], float("nan")
            )

    bad = crafted(run, tmp_path / "nan", nan_weights)
    cause = "its weights are not finite (1 tensors, e.g. conv_out.weight): the checkpoint holds a diverged model"
    rc, _, err = cli(capsys, "sample", bad, "--n", "2", "--no-progress")
    assert (
        rc == 2
        and one_error(err) == f"the network returned non-finite values at t = 10 (128 NaN, 0 infinite of 128); {cause}"
    )
    rc, _, err = cli(capsys, "evaluate", bad, "--limit", "2", "--no-progress")
    assert (
        rc == 2
        and one_error(err)
        == f"the network returned non-finite values at t = 1..10 (1280 NaN, 0 infinite of 1280); {cause}"
    )
    assert sorted(p.name for p in bad.iterdir()) == ["checkpoint.pt"]  # no samples.png, no bound_test.*


# =========================================================================== global state
@pytest.mark.parametrize("validation", [True, False])
def test_train_restores_pyro_validation_and_torch_threads(tmp_path, validation):
    pyro.enable_validation(validation)
    threads = torch.get_num_threads()
    trainer.train(
        TrainConfig(
            data="digits", T=10, batch_size=16, steps=2, net_overrides={"ch": 8}, threads=1, validate=not validation
        ),
        tmp_path / "run",
        progress=False,
    )
    assert is_validation_enabled() is validation and torch.get_num_threads() == threads


def test_the_library_checks_its_inputs_whatever_pyros_validation_flag(run):
    model, guide = TrainState.load(run).build()
    x = data.load("digits").test[:2]
    pyro.enable_validation(False)
    with pytest.raises(ValueError) as e:
        bound(model, guide, 5 * x)
    assert str(e.value) == "x_0 must lie in [-1, 1] (data scaled from 17 levels), got values in [-5, 5]"
    with pytest.raises(ValueError) as e:
        bound(model, guide, x * float("nan"))
    assert str(e.value) == "x_0 contains NaN"
    for t in (0, -1, 11):
        with pytest.raises(ValueError) as e:
            model.transition(x, torch.full((2,), t))
        assert str(e.value) == f"timesteps t must lie in 1..T = 1..10, got values in {t}..{t}"


def test_threads_option_and_its_default(tmp_path, capsys, monkeypatch):
    seen, real = [], trainer.SVI.step
    monkeypatch.setattr(
        trainer.SVI, "step", lambda self, *a, **k: seen.append(torch.get_num_threads()) or real(self, *a, **k)
    )
    before = torch.get_num_threads()
    assert train_cli(capsys, tmp_path / "run", "--steps", "2", "--threads", "1")[0] == 0
    assert seen == [1, 1] and torch.get_num_threads() == before
    rc, _, err = train_cli(capsys, tmp_path / "other", "--steps", "2", "--threads", "0")
    assert rc == 2 and one_error(err) == "threads must be a positive integer, got 0"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert runtime.default_threads() == 1
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert runtime.default_threads() is None
    assert "two jobs side by side on N cores: --threads N/2 each" in " ".join(
        parser()._subparsers._group_actions[0].choices["train"].format_help().split()
    )


# =========================================================================== one clear error, nothing written
def test_outputs_that_cannot_be_written_are_one_line_each_and_nothing_is_written(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [
        (["train", *TINY, "--steps", "2", "--out", blocker], f"the output {blocker} is a file, not a run directory"),
        (
            ["train", *TINY, "--steps", "2", "--out", blocker / "run"],
            f"cannot write {blocker / 'run'}: a file stands where a folder is needed",
        ),
        (["sample", run, "--n", "2", "--out", folder], f"the sample grid {folder} is a folder; give a file name"),
        (
            ["sample", run, "--n", "2", "--out", blocker / "x.png"],
            f"the folder of the sample grid {blocker} is a file, not a folder",
        ),
        (["sample", run, "--n", "0", "--out", tmp_path / "new" / "x.png"], "--n must be a positive integer, got 0"),
        (["evaluate", run, "--out", blocker], f"the evaluation output folder {blocker} is a file, not a folder"),
        (
            ["evaluate", run, "--out", blocker / "sub"],
            f"cannot write {blocker / 'sub'}: a file stands where a folder is needed ({blocker})",
        ),
        (["evaluate", run, "--limit", "0"], "--limit must be a positive number of images, got 0"),
        (["evaluate", run, "--max-batch", "0"], "--max-batch must be a positive integer, got 0"),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (
                ["evaluate", run, "--device", "cuda"],
                "device 'cuda' requested but CUDA is not available in this torch build/machine",
            )
        )
    before, run_before = tree(tmp_path), tree(run)
    for argv, message in cases:
        rc, out, err = cli(capsys, *argv, "--no-progress")
        assert rc == 2 and out == "" and one_error(err) == message, argv
    assert tree(tmp_path) == before and tree(run) == run_before
    assert not (tmp_path / "new").exists()


def test_a_read_only_folder_is_refused_before_any_work(run, tmp_path, capsys, monkeypatch):
    import pyro_ddpm.evaluate

    real = files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == run:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(
        pyro_ddpm.evaluate, "bound", lambda *a, **k: pytest.fail("evaluated before checking the folder")
    )
    monkeypatch.setattr(pyro_ddpm.cli, "sample", lambda *a, **k: pytest.fail("sampled before checking the folder"))
    before = tree(run)
    rc, _, err = cli(capsys, "evaluate", run, "--no-progress")
    assert rc == 2 and one_error(err) == f"cannot write {run}: the file system is read-only"
    rc, _, err = cli(capsys, "sample", run, "--no-progress")
    assert rc == 2 and one_error(err) == f"cannot write {run}: the file system is read-only"
    rc, _, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "8", "--no-progress")
    assert rc == 2 and one_error(err) == f"cannot write {run}: the file system is read-only"
    assert tree(run) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_run_directory(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    copy.chmod(0o555)
    try:
        rc, _, err = cli(capsys, "evaluate", copy, "--no-progress")
        assert rc == 2 and one_error(err) == f"cannot write {copy}: permission denied"
    finally:
        copy.chmod(0o755)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(run, tmp_path, capsys, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", fsync)
    out = tmp_path / "run"
    rc, _, err = train_cli(capsys, out, "--steps", "4", "--checkpoint-every", "2")
    assert rc == 2 and one_error(err) == f"cannot write {out / 'checkpoint.pt'}: the disk is full"
    assert sorted(p.name for p in out.iterdir()) == [files.LOCK_NAME]  # no checkpoint.pt, no temporary
    grid = tmp_path / "grid.png"
    rc, _, err = cli(capsys, "sample", run, "--n", "2", "--no-progress", "--out", grid)
    assert rc == 2 and one_error(err) == f"cannot write {grid}: the disk is full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw.pop("weights"), "{path} is a damaged pyro-ddpm checkpoint: it lacks 'weights'"),
        (
            lambda raw: raw["weights"]["ema"].update({"temb.0.weight": torch.zeros(3, 3)}),
            "checkpoint {path}: the network weights do not fit the network its config builds: shapes differ: "
            "temb.0.weight (3, 3) vs (32, 8) (stored vs built)",
        ),
        (
            lambda raw: raw["weights"]["ema"].pop("temb.0.bias"),
            "checkpoint {path}: the network weights do not fit the network its config builds: missing ['temb.0.bias']",
        ),
        (
            lambda raw: raw.update(config=[1, 2]),
            "{path} is a damaged pyro-ddpm checkpoint: its 'config' is a list, not a dict",
        ),
        (lambda raw: raw["data"].pop("shape"), "{path} is a damaged pyro-ddpm checkpoint: its 'data' lacks ['shape']"),
        (
            lambda raw: raw.update(format=1),
            "{path} is a pyro-ddpm checkpoint of format 1; this version reads format 2 "
            "(checkpoints of format 1 predate self-describing programs: train again)",
        ),
    ],
)
def test_damaged_checkpoints_are_one_line_each(run, tmp_path, capsys, change, message):
    bad = crafted(run, tmp_path / "bad", change)
    expected = message.format(path=bad / "checkpoint.pt")
    for argv in (["sample", bad, "--n", "2"], ["evaluate", bad, "--limit", "2"]):
        rc, _, err = cli(capsys, *argv, "--no-progress")
        assert rc == 2 and one_error(err) == expected
    assert sorted(p.name for p in bad.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_files_of_zero_images_are_one_line(tmp_path, capsys, split):
    from test_data import write_idx

    folder = tmp_path / "mnist"
    folder.mkdir()
    counts = {"train": 0 if split == "train" else 4, "test": 0 if split == "test" else 3}
    for name, stem in (("train", "train-images-idx3-ubyte"), ("test", "t10k-images-idx3-ubyte")):
        write_idx(folder / stem, np.zeros((counts[name], 28, 28), np.uint8))
    empty = folder / ("train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte")
    rc, _, err = cli(
        capsys,
        "train",
        "--data",
        folder,
        "--T",
        "5",
        "--ch",
        "8",
        "--steps",
        "2",
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    assert rc == 2 and one_error(err) == f"MNIST IDX file {empty} holds 0 images: the {split} split would be empty"
    assert not (tmp_path / "run").exists()


def test_bad_python_inputs_are_one_value_error_without_pyros_trace_table(run):
    model, guide = TrainState.load(run).build()
    x = data.load("digits").test[:2]
    cases = [
        (
            lambda: bound(model, guide, x.double()),
            "x_0 is torch.float64 but the network's parameters are torch.float32: "
            "convert the images (x0.to(torch.float32)) or the model",
        ),
        (
            lambda: bound(model, guide, x.half()),
            "x_0 is torch.float16 but the network's parameters are torch.float32: "
            "convert the images (x0.to(torch.float32)) or the model",
        ),
        (lambda: bound(model, guide, x.numpy()), "x_0 must be a torch tensor, got numpy.ndarray (use torch.as_tensor)"),
        (lambda: bound(model, guide, x[:0]), "x_0 is an empty batch (shape (0, 1, 8, 8))"),
        (lambda: bound(model, guide, x, max_batch=0), "max_batch must be a positive integer, got 0"),
        (
            lambda: bound_of_network(model.eps, model.schedule, model.likelihood, torch.zeros(2, 1, 9, 9)),
            "x_0 has shape (2, 1, 9, 9), but the data shape is (batch, 1, 8, 8)",
        ),
        (
            lambda: bound_of_network(model.eps, model.schedule, model.likelihood, torch.zeros(2, 8, 8)),
            "x_0 has shape (2, 8, 8), but the data shape is (batch, 1, 8, 8)",
        ),
        (
            lambda: model.transition(x, torch.ones(2, 1, dtype=torch.long)),
            "timesteps t must have shape (2,), one per input, got (2, 1)",
        ),
    ]
    from pyro_ddpm.elbo import TermwiseELBO

    for t, message in (
        (torch.ones(2, dtype=torch.long), "timesteps t must have shape (batch, K) = (2, K >= 1), got (2,)"),
        (torch.ones(3, 1, dtype=torch.long), "timesteps t must have shape (batch, K) = (2, K >= 1), got (3, 1)"),
        (torch.zeros(2, 1, dtype=torch.long), "timesteps t must lie in 1..T = 1..10, got values in 0..0"),
    ):
        cases.append((lambda t=t: TermwiseELBO().terms(model.per_timestep, guide.per_timestep, x, t), message))
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message and "Trace Shapes" not in str(e.value)


# =========================================================================== what a newcomer hit
RESUME_LINE = re.compile(
    r"pyro-ddpm: (SIGINT|SIGTERM) received: stopped at step (\d+) of 100000; checkpoint saved to "
    r"(\S+); resume with: pyro-ddpm train --out (\S+) --resume"
)


def test_sigint_and_sigterm_save_a_checkpoint_say_how_to_resume_and_resume(tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        cmd = [
            sys.executable,
            "-m",
            "pyro_ddpm.cli",
            "train",
            *TINY,
            "--steps",
            "100000",
            "--log-every",
            "1",
            "--checkpoint-every",
            "100000",
            "--out",
            str(out),
        ]
        procs[sig] = (out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    for sig, (out, proc) in procs.items():
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        # while it runs, a second writer on its folder is refused, naming it
        rc, _, err = train_cli(capsys, out, "--steps", "2")
        assert rc == 2 and one_error(err) == (
            f"the run directory {out} is in use by another pyro-ddpm process "
            f"(PID {proc.pid}); wait for it to finish or choose another --out"
        )
        proc.send_signal(sig)
    for sig, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130 and stdout == "" and "Traceback" not in stderr
        match = RESUME_LINE.fullmatch(stderr.strip().splitlines()[-1])
        assert match and match.group(1) == sig.name, stderr
        step = int(match.group(2))
        assert Path(match.group(3)) == out / "checkpoint.pt" and Path(match.group(4)) == out
        state = TrainState.load(out)
        assert state.step == step >= 1 and not state.finished
        assert [r["step"] for r in records(out)][-1] == step
        assert cli(capsys, "train", "--out", out, "--resume", "--steps", str(step + 2), "--no-progress")[0] == 0
        state = TrainState.load(out)
        assert state.step == step + 2 and state.finished


def test_sigterm_outside_training_stops_with_one_line_and_writes_nothing(run, capsys, monkeypatch):
    import pyro_ddpm.evaluate

    def bound(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # arrives while evaluating (it used to end the process silently)
        pytest.fail("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(pyro_ddpm.evaluate, "bound", bound)
    before, handler = tree(run), signal.getsignal(signal.SIGTERM)
    rc, out, err = cli(capsys, "evaluate", run, "--no-progress")
    assert (
        rc == 130
        and out == ""
        and err
        == ("pyro-ddpm: SIGTERM received: stopped; files are written atomically, so none was left half-written\n")
    )
    assert tree(run) == before and signal.getsignal(signal.SIGTERM) is handler


def test_an_interrupted_compare_resumes_its_unfinished_arm_when_run_again(tmp_path, capsys, monkeypatch):
    argv = [
        "compare",
        "--data",
        "swiss_roll-continuous",
        "--T",
        "10",
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--log-every",
        "1",
        "--samples",
        "8",
        "--limit",
        "8",
        "--arms",
        "eps-elbo",
        "--no-progress",
        "--out",
        tmp_path,
    ]
    interrupt_at(monkeypatch, 2)
    rc, _, err = cli(capsys, *argv)
    ckpt = tmp_path / "eps-elbo" / "checkpoint.pt"
    assert rc == 130 and err.strip() == (
        f"pyro-ddpm: SIGINT received: stopped at step 2 of 4; checkpoint saved to {ckpt}; resume with: the same "
        "pyro-ddpm compare command (finished arms are kept, unfinished ones resume)"
    )
    assert TrainState.load(ckpt).step == 2
    monkeypatch.undo()
    rc, out, _ = cli(capsys, *argv)
    assert rc == 0 and TrainState.load(ckpt).step == 4
    assert [r["step"] for r in records(tmp_path / "eps-elbo")] == [1, 2, 3, 4]
    # compare lists the files it wrote
    written = [line for line in out.splitlines() if line.startswith("written: ")]
    assert len(written) == 1
    for name in ("terms.png", "samples.png", "training.png", "comparison.md", "comparison.json"):
        assert str(tmp_path / name) in written[0] and (tmp_path / name).is_file()
    assert (
        f"runs (checkpoint.pt, metrics.jsonl, bound_test.nc/.json, samples.pt in each): {tmp_path / 'eps-elbo'}" in out
    )


def test_sample_shows_a_progress_bar(run, tmp_path, capsys):
    rc, out, err = cli(capsys, "sample", run, "--n", "2", "--out", tmp_path / "s.png")
    assert rc == 0 and out == f"2 samples written to {tmp_path / 's.png'}\n"
    assert "sample ancestral: 100%" in err and "11/11" in err  # x_10 ... x_1 and x_0


def test_compare_help_shows_the_values_that_will_be_used():
    text = " ".join(parser()._subparsers._group_actions[0].choices["compare"].format_help().split())
    digits = presets.DATASETS["digits"]["compare"]
    for flag, key in (
        ("--steps STEPS total training steps", "steps"),
        ("--lr LR learning rate", "lr"),
        ("--batch-size BATCH_SIZE the global batch, over all processes", "batch_size"),
    ):
        assert f"{flag} (default {digits['train'][key]}: the digits preset of pyro_ddpm.presets" in text
    # argparse may break a line after a hyphen inside an arm's name: compare without white space
    assert f"(defaultfordigits:{''.join(digits['default_arms'])};" in "".join(text.split())
    assert f"the digits network: {presets.NETWORKS['digits']['ch']})" in text


def test_quickstart_takes_quick_and_out(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("example_quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart.json", "samples.png"]
    assert json.loads((tmp_path / "quickstart.json").read_text()) == json.loads(json.dumps(result))
    assert (result["T"], result["steps"], result["test_images"]) == (10, 20, 16)
    assert 0 < result["bits_per_dim"] < 50 and math.isfinite(result["chain_bits_per_dim"])
    assert result["sites"] == [f"x_{s}" for s in range(10, 0, -1)] + ["x_0"]


def test_metrics_log_window_means_with_their_standard_errors(run):
    losses = TrainState.load(run).training["losses"]  # the per-image loss of each of the 6 steps
    rows = records(run)
    assert [r["step"] for r in rows] == [2, 4, 6] and all(r["window_steps"] == 2 for r in rows)
    for k, r in enumerate(rows):
        window = losses[2 * k : 2 * k + 2]
        mean = sum(window) / 2
        assert r["loss_per_image"] == pytest.approx(mean, rel=1e-12)
        assert r["loss_per_image_se"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in window) / 2), rel=1e-9)
        for name in ("L_T", "rate", "L_0"):
            assert math.isfinite(r[f"{name}_bits_per_dim"]) and r[f"{name}_bits_per_dim_se"] >= 0
        assert r["bits_per_dim"] == pytest.approx(
            r["L_T_bits_per_dim"] + r["rate_bits_per_dim"] + r["L_0_bits_per_dim"], rel=1e-9
        )
        assert r["bits_per_dim_se"] > 0 and r["bound_steps"] == 2


def test_rate_distortion_axes_are_logarithmic():
    from test_figures import tiny_bound

    from pyro_ddpm.figures import rate_distortion_figure

    fig = rate_distortion_figure(tiny_bound("gray"))
    distortion, rate, rate_distortion = fig.axes
    assert (distortion.get_yscale(), rate.get_yscale(), rate_distortion.get_yscale()) == ("log", "linear", "log")
    assert "log scale" in distortion.get_ylabel()


def test_sample_grids_are_scaled_up_and_padded(tmp_path):
    torch.manual_seed(0)
    images = torch.randint(0, 17, (16, 1, 8, 8)).float() / 8 - 1
    path = save_png(images, tmp_path / "grid.png")
    png = matplotlib.image.imread(path)[..., :3]
    tile = math.ceil(MIN_TILE / 8) * 8  # 64 px
    side = 4 * tile + 5 * PAD
    assert png.shape == (side, side, 3) and side >= 256
    colour = np.round(np.asarray(PAD_COLOR) * 255) / 255
    for gap in (0, PAD + tile):  # the frame and the gap after the first tile, across the whole grid
        assert np.allclose(png[gap : gap + PAD], colour, atol=1 / 255)
        assert np.allclose(png[:, gap : gap + PAD], colour, atol=1 / 255)
    # tile (row 1, column 2) is image 6, each pixel repeated 8 x 8 times
    top, left = PAD + 1 * (tile + PAD), PAD + 2 * (tile + PAD)
    expected = ((images[6, 0].numpy() + 1) / 2).repeat(8, 0).repeat(8, 1)
    assert np.allclose(png[top : top + tile, left : left + tile, 0], expected, atol=1 / 255)
