"""The images' Dockerfiles as the tests read them (no Docker engine runs here): their instructions,
the files they COPY, and the package that `pip install` builds from exactly those files."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]


def instructions(path: Path) -> list[tuple[str, str]]:
    return [(i["instruction"], i["value"]) for i in DockerfileParser(path=str(path)).structure
            if i["instruction"] != "COMMENT"]


def copied_sources(path: Path) -> list[str]:
    return [src for kind, value in instructions(path) if kind == "COPY" for src in shlex.split(value)[:-1]]


@dataclass
class BuiltWheel:
    names: list[str]  # the files it installs
    entry_points: str  # its entry_points.txt
    metadata: str  # its METADATA


def wheel_from_copies(dockerfile: Path, tmp_path: Path) -> BuiltWheel:
    """What `pip install` builds in the image, from a context holding only what `dockerfile` COPYs."""
    context = tmp_path / "context"
    for source in copied_sources(dockerfile):
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(origin, context / source)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("weightsync-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()

        def read(suffix: str) -> str:
            return next(archive.read(n).decode() for n in names if n.endswith(suffix))

        return BuiltWheel(names, read("entry_points.txt"), read("METADATA"))
