"""The SGLang image (docker/sglang.Dockerfile): SGLang's serving image plus weightsync[sglang]. No
Docker engine runs here, so its instructions are checked, the package is built from exactly the
files it COPYs (the plugin's entry point must be in it), and its command line is parsed by SGLang's
own parser (from the SGLang venv)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from helpers.images import copied_sources, instructions, wheel_from_copies

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "sglang.Dockerfile"


@pytest.mark.chart
def test_the_image_is_sglangs_serving_image_plus_the_plugin():
    parser = DockerfileParser(path=str(DOCKERFILE))
    assert parser.baseimage == "lmsysorg/sglang:v0.5.23"  # the release the plugin is pinned to
    steps = instructions(DOCKERFILE)
    runs = " ".join(value for kind, value in steps if kind == "RUN")
    assert 'pip install ".[sglang]"' in runs
    users = [value for kind, value in steps if kind == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    for source in copied_sources(DOCKERFILE):
        assert (ROOT / source).exists(), f"sglang.Dockerfile copies {source}, which does not exist"


@pytest.mark.chart
def test_the_copied_files_build_the_plugin_with_its_sglang_entry_point(tmp_path):
    wheel = wheel_from_copies(DOCKERFILE, tmp_path)
    for module in ("weightsync_sglang/__init__.py", "weightsync_sglang/worker.py", "weightsync_sglang/trainer.py",
                   "weightsync/checkpoint.py"):
        assert module in wheel.names
    assert "[sglang.srt.plugins]\nweightsync = weightsync_sglang:register" in wheel.entry_points
    assert "sglang==0.5.23" in wheel.metadata and not any("sgl_kernel" in name for name in wheel.names)


@pytest.mark.sglang
def test_the_serve_command_parses_with_sglangs_own_parser(sglang_python):
    """ENTRYPOINT + CMD, as SGLang 0.5.23's launch_server reads them."""
    steps = instructions(DOCKERFILE)
    (entry,) = [json.loads(value) for kind, value in steps if kind == "ENTRYPOINT"]
    (cmd,) = [json.loads(value) for kind, value in steps if kind == "CMD"]
    assert entry[:3] == ["python3", "-m", "sglang.launch_server"]
    probe = ("import argparse, json, sys\n"
             "from sglang.srt.server_args import ServerArgs\n"
             "parser = argparse.ArgumentParser()\n"
             "ServerArgs.add_cli_args(parser)\n"
             "a = parser.parse_args(json.loads(sys.argv[1]))\n"
             "print(json.dumps({'host': a.host, 'port': a.port, 'model': a.model_path}))\n")
    parsed = subprocess.run([sglang_python, "-c", probe, json.dumps(entry[3:] + cmd)], capture_output=True,
                            text=True, timeout=180, cwd=ROOT)
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    assert json.loads(parsed.stdout.strip().splitlines()[-1]) == {"host": "0.0.0.0", "port": 30000,
                                                                   "model": "Qwen/Qwen3-0.6B"}


@pytest.mark.chart
def test_the_example_is_a_valid_sglang_target_of_the_example_weightsync():
    """examples/sglang-inference.yaml: valid Kubernetes, selected by the example WeightSync, and a
    pod the operator drives as kind sglang on SGLang's port, with the image's user and the
    operator's token as SGLang's admin key."""
    import kubernetes_validate
    import yaml

    from weightsync_operator.pods import pod_ref

    (deployment,) = list(yaml.safe_load_all((ROOT / "examples" / "sglang-inference.yaml").read_text()))
    for version in ("1.30", "1.37"):
        kubernetes_validate.validate(deployment, version, strict=True)
    template = deployment["spec"]["template"]
    pod = {"metadata": {**template["metadata"], "name": "policy-sglang-0", "namespace": "rl", "uid": "u"},
           "spec": template["spec"],
           "status": {"phase": "Running", "podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]}}
    selector = yaml.safe_load((ROOT / "examples" / "weightsync.yaml").read_text())["spec"]["targetSelector"]
    assert selector["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ref = pod_ref(pod)
    assert ref.usable and ref.engine == "sglang" and ref.endpoint(8200).url == "http://10.0.0.7:30000"
    container = template["spec"]["containers"][0]
    assert container["image"].startswith("ghcr.io/weightsync/weightsync-sglang:")
    users = [value for kind, value in instructions(DOCKERFILE) if kind == "USER"]
    assert template["spec"]["securityContext"]["runAsUser"] == int(users[-1].split(":")[0])
    assert "--admin-api-key=$(WEIGHTSYNC_AUTH_TOKEN)" in container["args"]
