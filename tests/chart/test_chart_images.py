"""The operator and daemon Dockerfiles the chart's images are built from. No Docker engine runs
here, so: their instructions are checked against what the chart expects of the images, and the
package is really built from exactly the files they COPY, proving the `weightsync` command the
chart runs ends up in the image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from helpers.images import copied_sources, instructions, wheel_from_copies

pytestmark = pytest.mark.chart

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "charts" / "weightsync" / "values.yaml").read_text())
IMAGES = {"operator": ROOT / "docker" / "operator.Dockerfile", "daemon": ROOT / "docker" / "daemon.Dockerfile"}


@pytest.mark.parametrize("component", IMAGES)
def test_image_runs_as_the_chart_user_and_installs_the_package(component):
    steps = instructions(IMAGES[component])
    users = [value for kind, value in steps if kind == "USER"]
    assert users and users[-1].split(":")[0].isdigit(), "the last USER must be a numeric UID (runAsNonRoot)"
    uid = int(users[-1].split(":")[0])
    assert uid != 0 and uid == VALUES[component]["podSecurityContext"]["runAsUser"]
    runs = " ".join(value for kind, value in steps if kind == "RUN")
    assert f'pip install ".[{component}]"' in runs, "each image installs the extra of its component"
    (cmd,) = [json.loads(value) for kind, value in steps if kind == "CMD"]
    assert cmd[:2] == ["weightsync", component]
    for source in copied_sources(IMAGES[component]):
        assert (ROOT / source).exists(), f"{IMAGES[component].name} copies {source}, which does not exist"


def test_daemon_image_starts_from_a_cuda_pytorch_base():
    parser = DockerfileParser(path=str(IMAGES["daemon"]))
    assert parser.baseimage.startswith("pytorch/pytorch:") and "cuda" in parser.baseimage
    assert ("EXPOSE", "8200") in instructions(IMAGES["daemon"])


def test_operator_image_installs_no_torch():
    """The operator never touches a tensor: its image installs `weightsync[operator]` (which
    tests/project/test_packaging.py resolves without PyTorch) on plain Python, and nothing else."""
    parser = DockerfileParser(path=str(IMAGES["operator"]))
    assert parser.baseimage.startswith("python:")
    runs = [value for kind, value in instructions(IMAGES["operator"]) if kind == "RUN"]
    assert not any("torch" in r for r in runs), runs


def test_the_copied_files_build_the_package_with_the_weightsync_command(tmp_path):
    """What `pip install .` does in the image, from a context holding only what the Dockerfiles COPY."""
    assert set(copied_sources(IMAGES["operator"])) == set(copied_sources(IMAGES["daemon"]))
    wheel = wheel_from_copies(IMAGES["operator"], tmp_path)
    names, entry_points = wheel.names, wheel.entry_points
    for module in ("weightsync/__init__.py", "weightsync_daemon/server.py", "weightsync_operator/operator_cli.py",
                   "weightsync_cli/main.py"):
        assert module in names
    assert "weightsync = weightsync_cli.main:main" in entry_points
