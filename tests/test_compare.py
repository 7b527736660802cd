"""The comparison end to end (tiny network, few steps): every output file, its numbers, resuming, seeds."""

import json
import math

import numpy as np
import pytest
import torch

from pyro_ddpm import checkpoint
from pyro_ddpm.cli import main
from pyro_ddpm.compare import aggregate, markdown

TINY = [
    "--T",
    "10",
    "--steps",
    "4",
    "--batch-size",
    "16",
    "--ch",
    "8",
    "--log-every",
    "2",
    "--samples",
    "40",
    "--limit",
    "40",
    "--no-progress",
    "--no-vae",
]
ARMS = ["eps-elbo", "eps-simple", "eps-hybrid"]
RUN_FILES = ["checkpoint.pt", "metrics.jsonl", "bound_test.nc", "bound_test.json", "samples.pt"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    # side by side: two processes of one thread (the serial run of the same arms must give the same table)
    assert (
        main(
            ["compare", "--data", "digits", *TINY, "--arms", *ARMS, "--jobs", "2", "--threads", "1", "--out", str(out)]
        )
        == 0
    )
    return out


def test_every_output_file_is_written(compared):
    for name in ("comparison.md", "comparison.json", "terms.png", "samples.png", "training.png"):
        assert (compared / name).stat().st_size > 100, name
    for arm in ARMS:
        for name in RUN_FILES:
            assert (compared / arm / name).exists(), (arm, name)
        assert torch.load(compared / arm / "samples.pt").shape == (40, 1, 8, 8)
    config = checkpoint.load(compared / "eps-hybrid").config
    assert (config["model"], config["objective"], config["variance"]) == (
        "LearnedVarianceReverseProcess",
        "hybrid",
        "learned",
    )
    assert checkpoint.load(compared / "eps-elbo").config["timesteps"] == "importance"


def test_the_table_carries_the_runs_numbers_the_baseline_and_the_metrics_floor(compared):
    record = json.loads((compared / "comparison.json").read_text())
    assert list(record["table"]) == ARMS and record["seeds"] == [0]
    for arm, row in record["table"].items():
        run = json.loads((compared / arm / "bound_test.json").read_text())
        assert row["total"]["mean"] == run["total"]["bits_per_dim"] and row["total"]["se"] == run["total"]["se"]
        parts = sum(row[k]["mean"] for k in ("prior_L_T", "rate_L_1_to_L_T-1", "distortion_L_0"))
        assert parts == pytest.approx(row["total"]["mean"], rel=1e-9)
        bands = sum(row[k]["mean"] for k in ("L_1..L_9",))  # T = 10: one band, the whole rate
        assert bands == pytest.approx(row["rate_L_1_to_L_T-1"]["mean"], rel=1e-9)
        for key in ("fd", "kid", "score"):
            assert math.isfinite(row[key]["mean"]) and row[key]["se"] >= 0
        assert 1.0 <= row["score"]["mean"] <= 10.0
    # the per-pixel baseline, recomputed here from the training split's counts (add-one smoothing)
    from pyro_ddpm import data

    d = data.load("digits")
    k_train = np.rint((d.train.reshape(len(d.train), -1).numpy() + 1) * 8).astype(int)
    k_test = np.rint((d.test[:40].reshape(40, -1).numpy() + 1) * 8).astype(int)
    counts = np.stack([np.bincount(k_train[:, j], minlength=17) for j in range(64)])
    p = (counts + 1.0) / (len(k_train) + 17.0)
    bits = -np.log2(p[np.arange(64), k_test]).mean(1)
    assert record["pixel_categorical_baseline"]["bits_per_dim"] == pytest.approx(bits.mean(), rel=1e-9)
    text = (compared / "comparison.md").read_text()
    assert (
        sum(line.startswith("| ") for line in text.splitlines()) == 6
        and "per-pixel categorical" in text
        and "not comparable to Inception" in text
    )
    curve = record["runs"]["eps-elbo"][0]["training"]
    assert curve["step"] == [2, 4] and all(math.isfinite(v) for v in curve["bound_bits_per_dim"])


def test_running_again_measures_without_retraining_and_other_settings_are_refused(compared, capsys):
    before = (compared / "eps-elbo" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["compare", "--data", "digits", *TINY, "--arms", "eps-elbo", "--out", str(compared)]) == 0
    assert (compared / "eps-elbo" / "checkpoint.pt").stat().st_mtime_ns == before
    assert (
        main(["compare", "--data", "digits", *TINY, "--lr", "0.1", "--arms", "eps-elbo", "--out", str(compared)]) == 2
    )
    assert "lr = 0.001 (asked 0.1)" in capsys.readouterr().err


def test_several_seeds_report_the_mean_and_standard_error_over_seeds():
    runs = [
        {
            "bound": {
                k: {"bits_per_dim": v + i, "se": 0.5}
                for k, v in (("total", 3.0), ("prior_L_T", 0.0), ("rate_L_1_to_L_T-1", 3.0), ("distortion_L_0", 0.0))
            },
            "quality": {"fd": 10.0 * (i + 1), "fd_se": 1.0, "kid": 1.0, "kid_se": 0.1, "score": 5.0, "score_se": 0.2},
        }
        for i in range(3)
    ]
    row = aggregate({"elbo": runs})["elbo"]
    assert row["total"] == pytest.approx((4.0, 1.0 / math.sqrt(3)))  # values 3, 4, 5: sd 1
    assert row["fd"] == pytest.approx((20.0, 10.0 / math.sqrt(3)))
    assert row["kid"] == pytest.approx((1.0, 0.0))
    assert "over seeds" in markdown({"elbo": row}, {}, None, 3, "digits", {"elbo": {"objective": "elbo"}})


def test_continuous_data_reports_nats_and_skips_the_classifier_scores(tmp_path):
    assert (
        main(
            [
                "compare",
                "--data",
                "swiss_roll-continuous",
                "--T",
                "10",
                "--steps",
                "2",
                "--batch-size",
                "16",
                "--log-every",
                "1",
                "--samples",
                "40",
                "--limit",
                "40",
                "--arms",
                "eps-elbo",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    text = (tmp_path / "comparison.md").read_text()
    assert "total nats/dim" in text and "FD" not in text and "per-pixel" not in text


def test_example_script_quick_run(tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "elbo_vs_lsimple.py"
    result = runpy.run_path(str(script))["main"](
        ["--quick", "--arms", "eps-elbo", "eps-simple", "--out", str(tmp_path)]
    )
    assert set(result["table"]) == {"eps-elbo", "eps-simple"} and (tmp_path / "comparison.md").exists()


def test_the_main_command_defaults_to_the_digits_preset():
    from pyro_ddpm import options
    from pyro_ddpm.cli import Comparison, _given, parser
    from pyro_ddpm.compare import compare_config
    from pyro_ddpm.presets import DATASETS

    args = parser().parse_args(["compare", "--out", "x"])
    assert Comparison(**options.given(args, Comparison)).arms is None
    assert not hasattr(args, "steps") and not hasattr(args, "lr")  # not given: the preset's apply
    config, arms, default = compare_config(_given(args))
    assert config.data == "digits" and default == DATASETS["digits"]["compare"]["default_arms"]
    assert (config.steps, config.lr) == (
        DATASETS["digits"]["compare"]["train"]["steps"],
        DATASETS["digits"]["compare"]["train"]["lr"],
    )
    config, _, _ = compare_config(_given(parser().parse_args(["compare", "--out", "x", "--steps", "7"])))
    assert config.steps == 7


def test_an_arms_own_settings_yield_to_the_users_flags():
    from pyro_ddpm.compare import _under, arm_config
    from pyro_ddpm.train import TrainConfig

    arm = dict(model="M", lr=2e-3, schedule="cosine", net_overrides={"ch": 32, "dropout": 0.2})
    assert _under(arm, {}) == arm
    given = {"lr": 1e-4, "net_overrides": {"ch": 8}}
    assert _under(arm, given) == dict(model="M", schedule="cosine", net_overrides={"ch": 8, "dropout": 0.2})
    base = TrainConfig(data="digits", lr=1e-4, net_overrides={"ch": 8, "groups": 4})
    config = arm_config(base, _under(arm, given), seed=3)
    assert (config.lr, config.schedule, config.seed) == (1e-4, "cosine", 3)
    assert config.net_overrides == {"ch": 8, "groups": 4, "dropout": 0.2}


def test_runs_side_by_side_give_the_numbers_of_runs_one_after_another(compared, tmp_path):
    args = [*TINY, "--arms", *ARMS, "--jobs", "1", "--threads", "1", "--out", str(tmp_path)]
    assert main(["compare", "--data", "digits", *args]) == 0
    for arm in ARMS:  # the run files (the comparison's table is rewritten by another test of the fixture)
        serial, parallel = (json.loads((d / arm / "bound_test.json").read_text()) for d in (tmp_path, compared))
        assert serial == parallel
        assert torch.equal(torch.load(tmp_path / arm / "samples.pt"), torch.load(compared / arm / "samples.pt"))


@pytest.mark.parametrize(
    "torch_threads, threads, device, runs, jobs, expected",
    [
        (2, None, "cpu", 4, None, (2, 1, 2)),  # the main job on 2 cores: 2 processes of 1 thread, then 2
        (16, None, "cpu", 4, None, (4, 4, 16)),  # at most one process per run, the threads shared out
        (16, 8, "cpu", 4, None, (2, 8, 8)),  # --threads: per process
        (1, None, "cpu", 4, None, (1, 1, 1)),  # one thread (OMP_NUM_THREADS=1, pytest-xdist): one process
        (2, None, "cpu", 1, None, (1, 2, 2)),  # one run: one process with every thread
        (16, None, "cuda", 4, None, (1, 16, 16)),  # a GPU: one process
        (2, None, "cpu", 4, 3, (3, 1, 2)),  # --jobs: as asked
    ],
)
def test_the_runs_train_side_by_side_and_are_measured_with_every_thread(
    torch_threads, threads, device, runs, jobs, expected
):
    from pyro_ddpm.runtime import parallelism
    from pyro_ddpm.runtime import torch_threads as using

    with using(torch_threads):  # the device is not checked here: no GPU is needed to choose the split
        assert parallelism(device, threads, runs, jobs) == expected


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_a_bad_number_of_jobs_is_refused(jobs):
    from pyro_ddpm.runtime import parallelism

    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        parallelism("cpu", None, 4, jobs)


def _start_compare(args, **kwargs):
    """The compare command in a child process, with SIGINT at its default (a shell's background job
    ignores it, and Python then never turns it into KeyboardInterrupt)."""
    import signal
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "pyro_ddpm.cli", "compare", "--data", "digits", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kwargs,
    )


def _wait_until_training(proc, runs, timeout=180.0):
    import time

    deadline = time.monotonic() + timeout
    while not all((r / "metrics.jsonl").exists() and (r / "metrics.jsonl").stat().st_size > 0 for r in runs):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the runs did not start training"
        time.sleep(0.2)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupted_comparison_stops_every_run_where_it_can_resume(tmp_path, signame):
    """Ctrl-C (or SIGTERM) to a comparison training two runs side by side: each process saves its
    checkpoint and stops, the comparison names the signal and both runs and says how to resume; running
    it again finishes them (checked once)."""
    import signal

    args = [*TINY, "--steps", "100000", "--log-every", "5", "--checkpoint-every", "100000", "--arms", *ARMS]
    args += ["--jobs", "2", "--threads", "1", "--out", str(tmp_path)]
    runs = [tmp_path / arm for arm in ARMS[:2]]  # the third waits for a free process
    proc = _start_compare(args)
    try:
        _wait_until_training(proc, runs)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # on a failure above; its processes then stop themselves (they watch their parent)
    assert proc.returncode == 130, (out, err)
    assert "resume with: the same pyro-ddpm compare command" in err
    steps = [checkpoint.load(run).step for run in runs]  # no periodic checkpoint: these are the stop's
    assert f"pyro-ddpm: {signame} received: stopped at step {steps[0]} of 100000" in err  # the signal it got
    assert f"; {runs[1]} stopped at step {steps[1]} of 100000, checkpoint saved to {runs[1] / 'checkpoint.pt'}" in err
    assert all(0 < step < 100000 for step in steps)
    assert not (tmp_path / ARMS[2] / "checkpoint.pt").exists()  # the queued run never started
    if signame == "SIGINT":
        finish = [str(max(steps) + 2) if a == "100000" else a for a in args]
        assert main(["compare", "--data", "digits", *finish]) == 0
        assert all(checkpoint.load(tmp_path / arm).step == max(steps) + 2 for arm in ARMS)


def test_a_comparisons_processes_stop_when_it_is_killed(tmp_path):
    """SIGKILL leaves the comparison no chance to stop its processes: each notices its parent is gone,
    saves its checkpoint and stops."""
    import time

    args = [*TINY, "--steps", "100000", "--log-every", "5", "--checkpoint-every", "100000"]
    args += ["--arms", "eps-elbo", "eps-simple", "--jobs", "2", "--threads", "1", "--out", str(tmp_path)]
    runs = [tmp_path / arm for arm in ("eps-elbo", "eps-simple")]
    proc = _start_compare(args)
    try:
        _wait_until_training(proc, runs)
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 120
    while not all((r / "checkpoint.pt").exists() for r in runs):
        assert time.monotonic() < deadline, "the orphaned processes did not stop"
        time.sleep(0.5)
    for run in runs:
        assert 0 < checkpoint.load(run).step < 100000


def test_an_interrupt_crosses_processes_with_every_stopped_run():
    """The workers' ``Interrupted`` pickles from its fields (its message is rebuilt, not copied), and the
    comparison's combined one keeps the others' runs through a new resume hint."""
    import pickle
    from pathlib import Path

    from pyro_ddpm.runtime import Interrupted

    first = Interrupted("SIGTERM", 3, 10, Path("a/checkpoint.pt"), Path("a"))
    second = Interrupted("SIGTERM", 4, 10, Path("b/checkpoint.pt"), Path("b"))
    both = first.with_others("SIGINT", [second]).with_hint("again")
    back = pickle.loads(pickle.dumps(both))
    assert type(back) is Interrupted and str(back) == str(both)
    assert (back.signal, back.step, back.out, back.others[0].step, back.others[0].out) == (
        "SIGINT",
        3,
        Path("a"),
        4,
        Path("b"),
    )
    assert str(back) == (
        "SIGINT received: stopped at step 3 of 10; checkpoint saved to a/checkpoint.pt; b stopped at step 4 of 10, "
        "checkpoint saved to b/checkpoint.pt; resume with: again"
    )
