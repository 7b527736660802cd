"""The training and evaluation benchmark scripts run end to end (tiny settings; no timing is checked)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str]) -> str:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, capture_output=True,
                          text=True, timeout=300).stdout


def test_train_speed_script_prints_ratios_and_writes_the_table(tmp_path):
    args = ["--preset", "digits", "--batch", "4", "--T", "10", "--repeats", "1", "--markdown", str(tmp_path / "t.md")]
    out = _run("train_speed.py", args)
    lines = [line for line in out.splitlines() if "ratio" in line]
    assert len(lines) == 3 and "ratio 1.000" in lines[0]
    text = (tmp_path / "t.md").read_text().splitlines()
    rows = [line for line in text if line.startswith("| ") and "ms/step" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["plain torch (Algorithm 1)", "SVI elbo", "SVI simple"]
    assert all(float(r.split("|")[4].split()[0]) > 50 for r in rows)  # peak RSS of a process running torch, in MiB
    assert text[-1] == "`python benchmarks/train_speed.py " + " ".join(args) + "`"


def test_evaluate_speed_script_writes_the_table(tmp_path):
    args = ["--preset", "digits", "--T", "5", "--images", "4", "--repeats", "1", "--no-memory", "--markdown", str(tmp_path / "e.md")]
    out = _run("evaluate_speed.py", args)
    assert "bound / baseline" in out
    text = (tmp_path / "e.md").read_text()
    assert "| baseline |" in text and "| bound |" in text and "| bound / baseline |" in text
    assert text.splitlines()[-1] == "`python benchmarks/evaluate_speed.py " + " ".join(args) + "`"
