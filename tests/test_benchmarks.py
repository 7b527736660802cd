"""The benchmark scripts run end to end (tiny settings; nothing is timed here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_speed_script_prints_ratios():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--preset", "digits",
                          "--batch", "4", "--T", "10", "--repeats", "1"], check=True, capture_output=True,
                         text=True, timeout=300).stdout
    lines = [line for line in out.splitlines() if "ratio" in line]
    assert len(lines) == 3 and lines[0].rstrip().endswith("1.000")
