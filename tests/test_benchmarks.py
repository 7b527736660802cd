"""The training and evaluation benchmark scripts run end to end (tiny settings; no timing is checked)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str]) -> str:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout


def test_train_speed_script_prints_ratios_and_writes_the_table(tmp_path):
    args = [
        "--preset",
        "digits",
        "--batch",
        "4",
        "--T",
        "10",
        "--repeats",
        "1",
        "--no-diffusers",
        "--markdown",
        str(tmp_path / "t.md"),
    ]
    out = _run("train_speed.py", args)
    lines = [line for line in out.splitlines() if "ratio" in line]
    assert len(lines) == 4 and "ratio 1.000" in lines[0] and "to clipped 1.000" in lines[1]
    text = (tmp_path / "t.md").read_text().splitlines()
    rows = [line for line in text if line.startswith("| ") and "ms/step" not in line]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == [
        "plain torch (Algorithm 1)",
        "plain torch, gradient norm clipped as the trainer's",
        "SVI elbo",
        "SVI simple",
        DIFFUSERS,
    ]
    assert rows[-1].split("|")[6].strip() == "not run"  # --no-diffusers: a note, not a measurement
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows[:4]]
    for row in cells:
        ms = float(row[1])
        assert abs(float(row[2]) - 4 / (ms / 1000)) <= 0.01 * float(row[2]) + 0.1  # images/s
        assert float(row[3]) == pytest.approx(ms / float(cells[0][1]), rel=0.01, abs=0.002)  # to the first row
        assert float(row[4]) == pytest.approx(ms / float(cells[1][1]), rel=0.01, abs=0.002)  # to the clipped step
        assert float(row[5].split()[0]) > 50  # peak RSS of a process running torch, in MiB
    assert text[-1] == "`python benchmarks/train_speed.py " + " ".join(args) + "`"


DIFFUSERS = "diffusers (UNet2DModel, DDPMScheduler.add_noise, AdamW)"


def test_train_speed_diffusers_loop_and_fixed_cost(tmp_path):
    pytest.importorskip("diffusers")
    args = [
        "--preset",
        "digits",
        "--batch",
        "4",
        "--T",
        "10",
        "--repeats",
        "1",
        "--no-memory",
        "--fixed-cost",
        "--markdown",
        str(tmp_path / "t.md"),
    ]
    out = _run("train_speed.py", args)
    settings = next(line for line in out.splitlines() if line.startswith("settings"))
    assert "(176849 parameters; diffusers UNet2DModel 176849 parameters)" in settings  # the same size
    text = (tmp_path / "t.md").read_text()
    rows = {
        c[0]: c[1:]
        for c in (
            [x.strip() for x in line.split("|")[1:-1]]
            for line in text.splitlines()
            if line.startswith("| ") and "ms/step" not in line
        )
    }
    assert float(rows[DIFFUSERS][0]) > 0 and float(rows[DIFFUSERS][1]) > 0 and float(rows[DIFFUSERS][2]) > 0
    fixed = [name for name in rows if name.endswith("1-parameter network")]
    assert fixed == [f"{name}, 1-parameter network" for name in ("plain torch", "SVI elbo", "SVI simple")]
    assert rows[fixed[0]][1] == "" and float(rows[fixed[1]][1]) == pytest.approx(
        float(rows[fixed[1]][0]) - float(rows[fixed[0]][0]), abs=0.011
    )  # the fixed cost: SVI - plain torch
    assert "176849 parameters; diffusers UNet2DModel 176849 parameters" in text.splitlines()[0]


def test_the_diffusers_network_has_the_presets_parameter_count():
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_speed import diffusers_unet
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from pyro_ddpm.nets import build_network
    from pyro_ddpm.presets import NETWORKS

    for preset in ("digits", "mnist", "cifar10"):
        ours = sum(p.numel() for p in build_network(NETWORKS[preset]).parameters())
        theirs = sum(p.numel() for p in diffusers_unet(preset).parameters())
        assert theirs == ours, preset  # cifar10: 35746307, the paper's 35.7M


def test_evaluate_speed_script_writes_the_table(tmp_path):
    args = [
        "--preset",
        "digits",
        "--T",
        "5",
        "--images",
        "4",
        "--repeats",
        "1",
        "--no-memory",
        "--markdown",
        str(tmp_path / "e.md"),
    ]
    out = _run("evaluate_speed.py", args)
    assert "bound / baseline" in out
    text = (tmp_path / "e.md").read_text()
    assert "| baseline |" in text and "| bound |" in text and "| bound / baseline |" in text
    assert text.splitlines()[-1] == "`python benchmarks/evaluate_speed.py " + " ".join(args) + "`"
