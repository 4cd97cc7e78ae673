"""Container and cluster files: linted and validated here (no Docker engine or cluster runs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from resnet_serve.http.app import create_app
from resnet_serve.settings import Settings

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    command = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout


def test_the_dockerfile_bakes_verified_weights_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "resnet-serve download-weights" in text and "RESNET_SERVE_WEIGHTS_MODE=official" in text
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/health/ready" in text
    assert "ARG TORCH_INDEX" in text  # the CUDA build switch


def test_the_compose_file_is_valid_with_every_profile() -> None:
    result = compose("--profile", "load", "--profile", "monitoring", "config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"resnet-serve", "locust", "prometheus"}
    services = config["services"]
    assert "locustfile.py" in str(services["locust"]["command"])
    assert services["locust"]["profiles"] == ["load"] and services["prometheus"]["profiles"] == ["monitoring"]
    assert "profiles" not in services["resnet-serve"]  # `docker compose up` starts only the service


def test_kubernetes_manifests_validate_and_probe_real_endpoints() -> None:
    manifests = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", "1.32.0", *map(str, manifests)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {doc["kind"]: doc for path in manifests for doc in yaml.safe_load_all(path.read_text())}
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    routes = set(create_app(Settings()).openapi()["paths"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
