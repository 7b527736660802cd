"""The README's code runs as written (with a small T), and the slow main job meets its claims."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_program_runs():
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    assert "Schedule.linear(1000)" in code
    exec(compile(code.replace("Schedule.linear(1000)", "Schedule.linear(20)"), "README.md", "exec"), {})


@pytest.mark.slow
def test_main_job_beats_uniform_on_digits(tmp_path):
    """The README's main command: both objectives train to a test bound below the uniform 17-level code."""
    subprocess.run([sys.executable, "-m", "pyro_ddpm.cli", "compare", "--data", "digits", "--steps", "3000",
                    "--out", str(tmp_path), "--no-progress"], check=True)
    results = json.loads((tmp_path / "comparison.json").read_text())
    for name in ("elbo", "simple"):
        assert results[name]["total"]["bits_per_dim"] < math.log2(17) - 0.2
        assert (tmp_path / name / "samples.png").exists()
    assert (tmp_path / "comparison.md").read_text().count("|") > 10


def test_quickstart_example_runs(capsys):
    import runpy

    argv, sys.argv = sys.argv, ["quickstart.py", "--steps", "2", "--T", "10"]
    try:
        runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "total" in out and "chain form:" in out and "samples (16, 1, 8, 8)" in out
