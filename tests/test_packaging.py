"""The installed layout: models/ and guides/ ship as pyro_ddpm.models and pyro_ddpm.guides only."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_models_and_guides_under_the_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("pyro_ddpm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyro_ddpm/models/reverse_process.py" in names
    assert "pyro_ddpm/guides/forward_process.py" in names
    top_level = {n.split("/")[0] for n in names}
    assert not top_level & {"models", "guides", "tests", "examples"}, top_level
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pyro-ddpm = pyro_ddpm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_imports_models_and_guides():
    import pyro_ddpm.guides
    import pyro_ddpm.models

    assert pyro_ddpm.models.ReverseProcess.__module__ == "pyro_ddpm.models.reverse_process"
    assert pyro_ddpm.guides.ForwardProcess.__module__ == "pyro_ddpm.guides.forward_process"
