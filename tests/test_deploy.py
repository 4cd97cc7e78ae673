"""Container and cluster files, linted and validated (``make docker-check`` builds and runs the
images for real; see deploy/docker/check.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

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


def test_the_dockerfile_has_a_slim_default_and_a_torch_target_that_run_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.MULTILINE)
    assert stages[-1] == "slim" and "torch" in stages and "load" in stages  # the last stage is the default
    for arg in ("ARG BASE=", "ARG MODELS=export", "ARG WEIGHTS=official", "ARG TORCH_INDEX=", "ARG SLIM_EXTRAS=",
                "ARG SLIM_RUNTIME=onnxruntime"):
        assert arg in text
    final = text.split("AS slim\n", 1)[1]
    assert "USER 10001" in final and "HEALTHCHECK" in final and "/health/ready" in final
    assert 'ENTRYPOINT ["resnet-serve", "serve"]' in final  # exec form: SIGTERM reaches the server
    assert "RESNET_SERVE_RUNTIME=${SLIM_RUNTIME}" in final  # SLIM_EXTRAS=openvino can serve with it
    assert "curl" not in text and "torch-env" not in final  # no torch in the slim image
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()  # an allowlist: the context is what is named


def test_the_compose_file_is_valid_with_every_profile() -> None:
    result = compose("--profile", "load", "--profile", "monitoring", "config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"resnet-serve", "locust", "prometheus"}
    services = config["services"]
    assert services["resnet-serve"]["build"]["target"] == "slim" and services["locust"]["build"]["target"] == "load"
    assert "--headless" in str(services["locust"]["command"])
    assert all(s["network_mode"] == "host" for s in services.values())
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


def test_kubernetes_service_links_cannot_break_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Service named resnet-serve makes Kubernetes put RESNET_SERVE_PORT=tcp://<ip>:<port> and
    the like into every pod of the namespace (service links): our settings' own variables."""
    docs = [doc for path in (ROOT / "deploy" / "k8s").glob("*.yaml") for doc in yaml.safe_load_all(path.read_text())]
    kinds = {doc["kind"]: doc for doc in docs}
    service = kinds["Service"]
    prefix, port = service["metadata"]["name"].upper().replace("-", "_"), service["spec"]["ports"][0]["port"]
    links = {f"{prefix}_SERVICE_HOST": "10.0.0.1", f"{prefix}_SERVICE_PORT": str(port),
             f"{prefix}_PORT": f"tcp://10.0.0.1:{port}", f"{prefix}_PORT_{port}_TCP_PORT": str(port)}
    assert prefix == "RESNET_SERVE"  # so the links would be read as settings
    assert kinds["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match="Kubernetes' service link"):  # elsewhere, a message that says so
        Settings()
