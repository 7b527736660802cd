"""benchmarks/sample_speed.py runs end to end on tiny settings and writes its tables (timings not checked)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sample_speed.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_sample_speed_script_writes_the_table(tmp_path):
    md = tmp_path / "bench" / "sample.md"
    args = [
        "--preset",
        "digits",
        "--T",
        "10",
        "--images",
        "3",
        "--ddim-steps",
        "4",
        "--repeats",
        "2",
        "--markdown",
        str(md),
    ]
    out = run(*args)
    assert out.returncode == 0, out.stderr
    text = md.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("Sampling, preset digits (1, 8, 8)") and "3 images, T 10, DDIM 4 steps" in lines[0]
    assert "device cpu" in lines[0] and "torch " in lines[0]  # the machine is named
    assert lines[-1] == "`python benchmarks/sample_speed.py " + " ".join(args) + "`"
    rows = {
        cells(line)[0]: cells(line)
        for line in lines
        if line.startswith("| ") and not line.startswith("| phase") and not line.startswith("| time ratio")
    }
    assert list(rows) == ["forward", "ancestral", "ddim", "ancestral / forward", "ancestral / ddim"]
    assert [rows[p][1] for p in ("forward", "ancestral", "ddim")] == ["10", "10", "4"]
    for phase in ("forward", "ancestral", "ddim"):
        median, per_call = float(rows[phase][2]), float(rows[phase][3])
        # the table prints the median to 3 decimals: allow that rounding (half a unit) in the per-call column
        calls = int(rows[phase][1])
        assert median > 0 and per_call == pytest.approx(1000 * median / calls, rel=0.02, abs=0.01 + 0.5 / calls)
        assert re.fullmatch(r"\d+ \(\+\d+\.\d\)", rows[phase][4]), rows[phase][4]  # peak RSS of a fresh process
    assert float(rows["ancestral / forward"][1]) > 0 and rows["ancestral / forward"][2] == "<= 1.10"
    assert float(rows["ancestral / ddim"][1]) > 0
    assert "ratio ancestral / forward" in out.stdout


def test_sample_speed_script_rejects_bad_settings():
    out = run("--T", "10", "--ddim-steps", "11", "--no-memory")
    assert out.returncode == 2 and "--ddim-steps must satisfy 2 <= S <= T = 10" in out.stderr
