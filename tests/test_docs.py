"""The API reference (docs/api) builds from the docstrings with warnings as errors: a broken docstring fails here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each page of the reference and objects it must document (as the anchors autodoc writes).
PAGES = {
    "programs": ["pyro_ddpm.programs.ForwardProgram", "pyro_ddpm.programs.ReverseProgram", "pyro_ddpm.protocol"],
    "models": [
        "pyro_ddpm.models.ReverseProcess",
        "pyro_ddpm.models.X0PredictionReverseProcess",
        "pyro_ddpm.models.CategoricalReverseProcess",
        "pyro_ddpm.models.DDIM",
        "pyro_ddpm.models.logistic_grid.LogisticPrior",
    ],
    "guides": [
        "pyro_ddpm.guides.ForwardProcess",
        "pyro_ddpm.guides.MaskedForwardProcess",
        "pyro_ddpm.guides.LearnedSchedule",
        "pyro_ddpm.discrete.CategoricalSchedule",
    ],
    "likelihoods": ["pyro_ddpm.likelihoods.Likelihood", "pyro_ddpm.likelihoods.DiscretizedGaussian"],
    "elbo": ["pyro_ddpm.elbo.TermwiseELBO", "pyro_ddpm.elbo.Term"],
    "evaluate": [
        "pyro_ddpm.evaluate.bound",
        "pyro_ddpm.importance_weighted.importance_weighted",
        "pyro_ddpm.ode.ode_likelihood",
        "pyro_ddpm.adapters.from_diffusers",
    ],
    "sample": ["pyro_ddpm.sample.sample", "pyro_ddpm.respace.respace"],
    "harness": [
        "pyro_ddpm.train.TrainConfig",
        "pyro_ddpm.train.train",
        "pyro_ddpm.checkpoint.TrainState",
        "pyro_ddpm.compare.compare",
        "pyro_ddpm.cli.main",
    ],
    "schedule": ["pyro_ddpm.schedule.Schedule", "pyro_ddpm.schedule.derive"],
    "nets": ["pyro_ddpm.nets.UNet", "pyro_ddpm.nets.EpsNetwork"],
    "timesteps": ["pyro_ddpm.timesteps.UniformSampler", "pyro_ddpm.timesteps.LossAwareSampler"],
    "data": ["pyro_ddpm.data.Dataset", "pyro_ddpm.data.load"],
    "figures": ["pyro_ddpm.figures.plot_terms"],
    "metrics": ["pyro_ddpm.metrics.frechet_distance", "pyro_ddpm.metrics.sample_quality"],
    "vae": ["pyro_ddpm.vae.VAE"],
    "registry": ["pyro_ddpm.registry.Registry"],
    "files": ["pyro_ddpm.files.RunLock", "pyro_ddpm.files.atomic_write"],
    "optim": ["pyro_ddpm.optim.JointOptimizer"],
    "presets": ["pyro_ddpm.presets.settings"],
}


def test_api_reference_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx", reason="the API reference needs sphinx: pip install -e '.[docs]'")
    out = tmp_path / "html"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(ROOT / "docs" / "api"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    index = (out / "index.html").read_text(encoding="utf-8")
    for page, objects in PAGES.items():
        assert f'href="{page}.html"' in index, f"index.html does not link {page}.html"
        html = (out / f"{page}.html").read_text(encoding="utf-8")
        for name in objects:
            assert f'id="{name}"' in html or f'id="module-{name}"' in html, f"{page}.html does not document {name}"
