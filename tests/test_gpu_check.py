"""benchmarks/gpu_check.py in its CI mode (--device cpu --small) end to end, its reports, and its one-line
failures (forced by --inject); benchmarks/gpu_check.sh passes a failure on with exit code 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ONE = ["--presets", "digits", "--objectives", "elbo", "--precisions", "fp32", "--no-bench"]


def run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("OUT", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--small", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_small_cpu_mode_passes_every_check_and_writes_the_reports(tmp_path):
    out = tmp_path / "out"
    done = run("--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("gpu_check: OK, ")
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failed"] is None and report["finished"] and report["mode"] == "small"
    checks = [c["check"] for c in report["checks"]]
    assert all(c["ok"] for c in report["checks"])
    for preset in ("digits", "cifar10"):
        for objective in ("elbo", "simple", "hybrid"):
            for precision in ("fp32", "bf16"):
                assert f"train {preset}/{objective}/{precision}" in checks
                assert f"resume {preset}/{objective}/{precision}" in checks
        assert f"bound {preset}" in checks
        for objective in ("elbo", "hybrid"):
            assert {f"sample {preset}/{objective} ancestral", f"sample {preset}/{objective} ddim"} <= set(checks)
    resumes = [c for c in report["checks"] if c["check"].startswith("resume ")]
    assert all(c["net"]["identical"] and c["ema"]["identical"] for c in resumes)  # CPU: exactly the same run
    bounds = [c for c in report["checks"] if c["check"].startswith("bound ")]
    assert all(c["max_rel_diff"] <= 1e-4 and c["fp64_max_rel_diff"] < 1e-5 for c in bounds)
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# gpu_check: all checks passed")
    assert "## train and resume" in md and "## bound: device against cpu" in md and "## sampling" in md
    for name in ("train_digits", "evaluate_digits", "sample_digits"):
        table = (out / f"bench_{name}.md").read_text()
        assert f"## benchmark {name}" in md and table.strip() in md
        assert "device cpu" in table.splitlines()[0]
    assert "fixed per-step cost" in (out / "bench_train_digits.md").read_text()
    assert len(list(out.iterdir())) <= 8  # the check writes a handful of report files, not its runs


@pytest.mark.parametrize(
    "inject, what, why",
    [
        ("bad-setting", "train digits/elbo/fp32", "lr must be a positive number, got nan"),
        ("resume", "resume digits/elbo/fp32", "weights differ from the uninterrupted run's"),
        ("sample", "sample digits/elbo ancestral", "samples leave the 17-level grid"),
    ],
)
def test_a_forced_failure_stops_with_one_line_and_exit_code_1(tmp_path, inject, what, why):
    out = tmp_path / "out"
    done = run("--out", str(out), *ONE, "--inject", inject, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpu_check: FAILED {what}: ") and why in lines[0], done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failed"]["check"] == what and why in report["failed"]["why"]
    assert (out / "gpu_check.md").read_text().startswith(f"# gpu_check: FAILED at {what}")


def test_an_impossible_tolerance_fails_the_bound_check(tmp_path):
    done = run("--out", str(tmp_path), *ONE, "--bound-rtol", "-1", timeout=120)  # no difference is below -1
    assert done.returncode == 1
    line = done.stderr.strip()
    assert line.startswith("gpu_check: FAILED bound digits: per-image totals on cpu and cpu differ")
    assert "\n" not in line
    assert "(tolerance -1;" in line


def test_the_wrapper_passes_a_failure_on(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--small",
            *ONE,
            "--inject",
            "bad-setting",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1].startswith("gpu_check: FAILED train digits/elbo/fp32: ")
    assert "gpu_check: FAILED train digits/elbo/fp32" in (tmp_path / "gpu_check.log").read_text()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed"]["check"] == "train digits/elbo/fp32"
