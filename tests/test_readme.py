"""The README's code runs as written (with a small T), and the slow main job meets its claims."""

import json
import math
import re
import shlex
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
def test_main_job_as_written_in_the_readme(tmp_path):
    """The README's main command, as written there (output redirected): every objective trains to a test
    bound below the uniform 17-level code, and the table, figures and per-run files are written."""
    setup = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    command = shlex.split(setup.split("&&", 1)[1].strip())
    assert command[:2] == ["pyro-ddpm", "compare"]
    out = command.index("--out") + 1
    command[out] = str(tmp_path)
    subprocess.run([sys.executable, "-m", "pyro_ddpm.cli", *command[1:], "--no-progress"], check=True)
    record = json.loads((tmp_path / "comparison.json").read_text())
    for name, row in record["table"].items():
        assert row["total"]["mean"] < math.log2(17) - 0.2, name
        assert (tmp_path / name / "bound_test.nc").exists()
    for name in ("comparison.md", "terms.png", "samples.png", "training.png"):
        assert (tmp_path / name).exists()


def test_quickstart_example_runs(capsys, tmp_path):
    import runpy

    argv, sys.argv = sys.argv, ["quickstart.py", "--steps", "2", "--T", "10", "--out", str(tmp_path)]
    try:
        runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "total" in out and "chain form:" in out and "samples (16, 1, 8, 8)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart.json", "samples.png"]
