"""The README runs as written: its quickstart (with a small T) and its commands, every command it and the docs
show exists with the flags they give it, every relative link points to a file, the docs' code runs, and the
slow main job meets the README's claims."""

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]  # the user's documentation: the README and docs/*.md


def test_readme_program_runs():
    code = next(
        c
        for c in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
        if "Schedule.linear(1000)" in c
    )
    exec(compile(code.replace("Schedule.linear(1000)", "Schedule.linear(20)"), "README.md", "exec"), {})


@pytest.mark.slow
def test_main_job_as_written_in_the_readme(tmp_path):
    """The README's main command, as written there (output redirected), and the claims the README makes of it:
    the grid-posterior arm's bound is at most 1.70 bits/dim and beats the per-pixel categorical baseline
    and the Pyro VAE's importance-weighted bound; for the eps model the importance-sampled true bound beats
    L_simple on the likelihood by more than two combined standard errors, and L_simple beats it on the
    samples' FD by more than two; every file is written."""
    setup = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    command = shlex.split(setup.split("&&", 1)[1].strip())
    assert command[:2] == ["pyro-ddpm", "compare"]
    out = command.index("--out") + 1
    command[out] = str(tmp_path)
    subprocess.run([sys.executable, "-m", "pyro_ddpm.cli", *command[1:], "--no-progress"], check=True)
    record = json.loads((tmp_path / "comparison.json").read_text())
    table, baselines = record["table"], record["baselines"]
    assert set(table) == {"eps-elbo", "eps-simple", "grid-elbo", "grid-simple"}
    for name, row in table.items():
        assert row["total"]["mean"] < math.log2(17) - 0.2, name
        assert (tmp_path / name / "bound_test.nc").exists()
    best = min(row["total"]["mean"] for row in table.values())
    assert best == min(table["grid-elbo"]["total"]["mean"], table["grid-simple"]["total"]["mean"])
    pixel = record["pixel_categorical_baseline"]["bits_per_dim"]
    iwae = next(v["mean"] for k, v in baselines.items() if "IWAE" in k)
    assert best < pixel and best < iwae
    assert best <= 1.70  # the README's claim for the best arm

    def apart(a, b, key):  # a below b by more than two combined standard errors
        return b[key]["mean"] - a[key]["mean"] > 2 * math.hypot(a[key]["se"], b[key]["se"])

    assert apart(table["eps-elbo"], table["eps-simple"], "total")  # the true bound's likelihood claim
    assert apart(table["eps-simple"], table["eps-elbo"], "fd")  # L_simple's sample-quality claim
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


def test_evaluate_elsewhere_snippet_runs(capsys):
    """docs/evaluate_elsewhere.md's quick start (a random diffusers UNet evaluated three ways) runs as written
    (a small T)."""
    pytest.importorskip("diffusers")
    code = next(
        c
        for c in re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "evaluate_elsewhere.md").read_text(), re.S)
        if "adapters.from_diffusers" in c
    )
    assert "num_train_timesteps=1000" in code
    exec(compile(code.replace("num_train_timesteps=1000", "num_train_timesteps=10"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "total" in printed and len(printed.strip().splitlines()[-2:]) == 2


def test_readme_discrete_commands_run(tmp_path, monkeypatch):
    """The README's masked-diffusion train / evaluate / sample commands, as written but for a small T, few
    steps and few images (flags given again at the end win), run in order on a fresh folder."""
    from pyro_ddpm.cli import main

    block = next(
        b
        for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
        if "--guide MaskedForwardProcess" in b
    )
    small = {"train": ["--T", "20", "--steps", "6", "--log-every", "3"], "evaluate": ["--limit", "4"], "sample": []}
    ran = []
    monkeypatch.chdir(tmp_path)
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] != ["pyro-ddpm"] or words[1] not in small:
            continue
        assert main(words[1:] + small[words[1]] + ["--no-progress"] * (words[1] != "train")) in (0, None)
        ran.append(words[1])
    assert ran == ["train", "evaluate", "sample"]
    assert (tmp_path / "runs" / "masked" / "bound_test.json").is_file()
    assert (tmp_path / "runs" / "masked" / "samples.png").is_file()


# --------------------------------------------------------------------------- every command shown exists
def _code(text: str) -> list[str]:
    """The commands of a Markdown page: each line of its fenced code blocks (continuation lines joined)
    and each inline code span."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return lines


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from pyro_ddpm.cli import parser

    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _invocations(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, words after it) for every ``pyro-ddpm SUB ...`` (or ``-m pyro_ddpm.cli SUB ...``) shown."""
    found = []
    for line in _code(text):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in prose: not a command
            continue
        for i, word in enumerate(words):
            start = i + 1 if word == "pyro-ddpm" else i + 2 if words[i : i + 2] == ["-m", "pyro_ddpm.cli"] else None
            if start is not None and start < len(words) and re.fullmatch(r"[a-z]+", words[start]):
                found.append((words[start], words[start + 1 :]))
    return found


def _flags(words: list[str]) -> list[str]:
    """The options among a command's words ([--x] shown as optional counts; a value such as -1 does not)."""
    flags = []
    for word in words:
        word = word.strip("[]")
        if re.match(r"--?[A-Za-z]", word):
            flags.append(word.split("=", 1)[0])
    return flags


def test_every_pyro_ddpm_command_shown_exists_with_its_flags():
    """Every `pyro-ddpm SUBCOMMAND ...` in the README's and the docs' code is a subcommand of
    pyro_ddpm.cli.parser() and every --flag it uses is one that subcommand's parser accepts (nothing is run)."""
    subs = _subparsers()
    options = {name: {s for a in p._actions for s in a.option_strings} for name, p in subs.items()}
    seen, bad = set(), []
    for page in PAGES:
        for sub, words in _invocations(page.read_text()):
            where = f"{page.relative_to(ROOT)}: pyro-ddpm {sub} {' '.join(words)}"
            if sub not in subs:
                bad.append(f"{where}: no subcommand {sub!r} (there are {sorted(subs)})")
                continue
            seen.add(sub)
            bad += [f"{where}: {sub} has no option {f}" for f in _flags(words) if f not in options[sub]]
    assert not bad, "\n".join(bad)
    assert seen == set(subs)  # the README and docs show every subcommand
    readme = {sub for sub, _ in _invocations((ROOT / "README.md").read_text())}
    assert readme == set(subs)


def test_the_command_checker_catches_a_wrong_subcommand_or_flag():
    subs = _subparsers()
    options = {s for a in subs["train"]._actions for s in a.option_strings}
    shown = _invocations("```bash\npyro-ddpm train --data digits \\\n    --no-such-flag 1 --out r  # --steps\n```\n")
    assert shown == [("train", ["--data", "digits", "--no-such-flag", "1", "--out", "r"])]
    assert [f for f in _flags(shown[0][1]) if f not in options] == ["--no-such-flag"]
    assert _invocations("`pyro-ddpm evaluate --diffusers DIR [--ode]`") == [
        ("evaluate", ["--diffusers", "DIR", "[--ode]"])
    ]
    assert _flags(["[--ode]", "--lr=1e-3", "-K", "4", "-1"]) == ["--ode", "--lr", "-K"]
    assert _invocations("`torchrun --nproc_per_node 2 -m pyro_ddpm.cli train --out r`")[0][0] == "train"
    assert (
        _invocations("`pyro-ddpm frobnicate --out r`") == [("frobnicate", ["--out", "r"])] and "frobnicate" not in subs
    )


def test_every_script_the_readme_and_docs_name_exists():
    """Every `examples/X.py` and `benchmarks/X.py` (run as `python ...` or named) in the README and the docs is
    a file; so is every other repository file they name in code (`tests/...py`, `guides/...py`, ...)."""
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path in set(
            re.findall(r"\b((?:examples|benchmarks|tests|guides|models|pyro_ddpm)/[\w/]+\.(?:py|sh))", text)
        ):
            if not (ROOT / path).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing
    scripts = re.findall(r"python (?:\S+/)?((?:examples|benchmarks)/\w+\.py)", (ROOT / "README.md").read_text())
    assert "examples/quickstart.py" in scripts


# --------------------------------------------------------------------------- links
def _links(text: str) -> list[str]:
    """The targets of a Markdown page's links and images, outside code."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    heads = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_in_the_readme_and_docs_points_to_a_file():
    broken, count = [], 0
    for page in PAGES:
        for target in _links(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            count += 1
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
    assert count > 20
    index = " ".join(_links((ROOT / "docs" / "index.md").read_text()))
    assert all(p.name in index for p in DOCS if p.name != "index.md") and "api/index.rst" in index


def test_the_link_checker_sees_links_and_ignores_code():
    assert _links("[a](docs/x.md) ![f](fig.png) `[b](no.md)` [c](https://x.org)\n```\n[d](no.md)\n```\n") == [
        "docs/x.md",
        "fig.png",
        "https://x.org",
    ]


# --------------------------------------------------------------------------- the docs' code
def test_extending_excerpts_are_the_files_own_lines():
    """Each excerpt in docs/extending.md and the README (a code block opening with `# FILE (excerpt)`) is made
    of that file's lines, in the file's order ("..." stands for lines left out)."""
    text = (ROOT / "docs" / "extending.md").read_text() + (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n# (\S+) \(excerpt\)\n(.*?)```", text, re.S)
    assert {f for f, _ in blocks} >= {
        "pyro_ddpm/train.py",
        "examples/custom_likelihood.py",
        "examples/custom_guide.py",
        "tests/outside_grid.py",
        "guides/masked.py",
        "guides/forward_process.py",
        "pyro_ddpm/discrete.py",
    }
    for name, block in blocks:
        source = (ROOT / name).read_text().splitlines()
        at = 0
        for line in filter(str.strip, block.splitlines()):
            if line.strip() == "...":
                continue
            try:
                at = source.index(line, at) + 1
            except ValueError:
                pytest.fail(f"the excerpt of {name} has a line that is not in it (in order): {line}")


def test_paired_difference_snippet_runs(tmp_path, monkeypatch, capsys):
    """docs/results.md's paired-difference program, on two arms' bound_test.nc written by the evaluator."""
    import torch

    from pyro_ddpm import data
    from pyro_ddpm.evaluate import bound, save, summarize
    from pyro_ddpm.guides import ForwardProcess
    from pyro_ddpm.likelihoods import DiscretizedGaussianLikelihood
    from pyro_ddpm.models import ReverseProcess
    from pyro_ddpm.nets import build_network
    from pyro_ddpm.presets import NETWORKS
    from pyro_ddpm.schedule import Schedule

    code = next(
        c for c in re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "results.md").read_text(), re.S) if "bits(" in c
    )
    schedule, x = Schedule.linear(5), data.load("digits").test[:6]
    totals = {}
    for arm, seed in (("eps-elbo", 0), ("eps-simple", 1)):
        torch.manual_seed(seed)
        model = ReverseProcess(
            build_network(dict(NETWORKS["digits"], ch=8)), schedule, "large", DiscretizedGaussianLikelihood(17)
        )
        idata = bound(model, ForwardProcess(schedule), x)
        (tmp_path / "runs" / "compare" / arm).mkdir(parents=True)
        summary = summarize(idata)
        save(idata, summary, tmp_path / "runs" / "compare" / arm, stem="bound_test")
        totals[arm] = summary["total"]["bits_per_dim"]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/results.md", "exec"), {})
    printed = capsys.readouterr().out
    mean = float(re.search(r"eps-simple - eps-elbo: (-?[\d.]+) ±", printed).group(1))
    assert mean == pytest.approx(totals["eps-simple"] - totals["eps-elbo"], abs=1.5e-3)
