"""``make docker-check``: build the slim, OpenVINO and torch images and check them end to end, for real.

On this machine: install and start the Docker engine if it is missing (Debian's docker.io,
``dockerd --storage-driver=vfs --bridge=none --iptables=false --ip-masq=false``), build a
stand-in Python base from Debian when ``python:3.11-slim`` cannot be pulled, export the model
repository with the host's full install (``MODELS=context``: the torch build stage would copy
gigabytes into every layer under vfs, and the official weights cannot be downloaded here, so it
is exported once from random-init weights, loudly), build ``resnet-serve:slim``,
``resnet-serve:openvino`` (the slim target with ``SLIM_EXTRAS=openvino``) and
``resnet-serve:torch`` with pip reaching the host's package indexes over loopback, then run each
on the host network: healthy in time, classifies real photos, explains one (slim and openvino:
CAM without torch; torch: Grad-CAM), not root, answers every accepted request of a burst during
``docker stop`` and exits 0; then docker compose with the locust profile.
Prints image sizes, start times and RSS, writes ``benchmarks/results/docker_check.{json,md}``,
and removes the containers it started (the images stay).

    python deploy/docker/check.py [--skip-torch] [--weights random|official]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "docker"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from http_bench import is_ready  # noqa: E402
from images import default_images  # noqa: E402
from machine import publish  # noqa: E402

STAND_IN = "resnet-serve-base:bookworm"
DOCKERD = ["dockerd", "--storage-driver=vfs", "--bridge=none", "--iptables=false", "--ip-masq=false"]


def sh(*command: str, check: bool = True, capture: bool = False, env: dict[str, str] | None = None,
       timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=check, text=True, capture_output=capture, env=env, timeout=timeout)


@functools.cache
def docker() -> str:
    """A docker client that builds with BuildKit (only it skips the stages a target does not use):
    one with the buildx plugin, or a client older than 23 (Debian's docker.io), which has BuildKit
    built in. The first one on PATH may be neither."""
    candidates = [c for c in dict.fromkeys([shutil.which("docker"), "/usr/bin/docker"]) if c and Path(c).exists()]
    for client in candidates:
        if subprocess.run([client, "buildx", "version"], capture_output=True).returncode == 0:
            return client
        version = subprocess.run([client, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
        if version.stdout.strip().split(".")[0].isdigit() and int(version.stdout.split(".")[0]) < 23:
            return client
    raise SystemExit("no docker client here builds with BuildKit (install the buildx plugin)")


def engine_ready() -> bool:
    if shutil.which("dockerd") is None or not Path("/usr/bin/docker").exists() and shutil.which("docker") is None:
        return False
    return sh(docker(), "info", check=False, capture=True).returncode == 0


def ensure_engine() -> None:
    """The Docker engine, installed with apt and started here if it is not running."""
    if engine_ready():
        return
    if shutil.which("dockerd") is None or not Path("/usr/bin/docker").exists():
        sh("apt-get", "update", "-q")
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", "docker.io", "debootstrap")
    BUILD.mkdir(parents=True, exist_ok=True)
    with (BUILD / "dockerd.log").open("ab") as log:
        subprocess.Popen(DOCKERD, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(120):
        if engine_ready():
            return
        time.sleep(1)
    raise SystemExit(f"the Docker engine did not start; see {BUILD / 'dockerd.log'}")


def image_exists(name: str) -> bool:
    return sh(docker(), "image", "inspect", name, check=False, capture=True).returncode == 0


def base_image() -> str:
    """python:3.11-slim where it can be pulled, else a stand-in from Debian bookworm's python3."""
    if image_exists("python:3.11-slim") or sh(docker(), "pull", "python:3.11-slim", check=False,
                                                timeout=120).returncode == 0:
        return "python:3.11-slim"
    if not image_exists(STAND_IN):
        if shutil.which("debootstrap") is None:
            sh("apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap")
        rootfs = BUILD / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
           str(rootfs), "http://deb.debian.org/debian")
        sh("chroot", str(rootfs), "apt-get", "clean")
        for leftover in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale", "var/log"):
            for path in (rootfs / leftover).glob("*"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([docker(), "import", "-", STAND_IN], stdin=tar.stdout, check=True)
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    return STAND_IN


def export_models(weights: str) -> None:
    """The repositories baked into the images (MODELS=context), exported by the host's full
    install as the Dockerfile's export stage would: slim gets ONNX INT8, torch TorchScript and the
    eager weights for explanations."""
    models = BUILD / "models"
    wanted = {"slim": "model.fp32.cam.npz", "torch": "model.fp32.state_dict.pt"}  # what explanations read
    if all((models / image / "resnet18" / "1" / file).is_file() for image, file in wanted.items()):
        return
    shutil.rmtree(models, ignore_errors=True)
    for image, fmt, precisions in (("slim", "onnx", "int8"), ("torch", "torchscript,state_dict", "fp32,int8")):
        sh(sys.executable, "-m", "resnet_serve", "export", "--weights", weights, "--repository",
           str(models / image), "--format", fmt, "--precision", precisions)


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        pass


@contextlib.contextmanager
def loopback_indexes() -> Iterator[dict[str, str]]:
    """pip's settings for the builds: the host's local indexes (file://) served on loopback, so a
    build on the host network reaches them as the host does; remote indexes as they are."""
    config = sh(sys.executable, "-m", "pip", "config", "list", capture=True).stdout
    settings = dict(line.split("=", 1) for line in config.splitlines() if "=" in line)
    value = lambda key: " ".join(v.strip("'\"") for k, v in settings.items() if k.endswith(f".{key}"))  # noqa: E731
    extra = list(dict.fromkeys(value("extra-index-url").split()))
    links = list(dict.fromkeys(value("find-links").split()))
    servers, rewritten = [], {}

    def served(folder: Path) -> str:
        """``folder`` over loopback HTTP (its parent is served, so an index's ../../files links work)."""
        handler = functools.partial(_QuietFiles, directory=str(folder.parent))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/{folder.name}/"

    for location in [u for u in extra if u.startswith("file://")] + links:
        rewritten[location] = served(Path(location.removeprefix("file://")))
    pip = {"PIP_EXTRA_INDEX_URL": " ".join(rewritten.get(u, u) for u in extra),
           "PIP_FIND_LINKS": " ".join(rewritten.get(link, link) for link in links),
           "PIP_TRUSTED_HOST": "127.0.0.1"}
    try:
        yield {k: v for k, v in pip.items() if v}
    finally:
        for server in servers:
            server.shutdown()


# image tag: (Dockerfile target, its build arguments). PyTorch's own index is out of reach here:
# torch comes through pip's settings.
IMAGES = {
    "slim": ("slim", {}),
    "openvino": ("slim", {"SLIM_EXTRAS": "openvino", "SLIM_RUNTIME": "openvino"}),
    "torch": ("torch", {"TORCH_INDEX": ""}),
    "load": ("load", {}),
}
SERVES = {"slim": "onnxruntime", "openvino": "openvino", "torch": "torchscript"}  # the runtime each image serves with


def build(image: str, base: str, pip: dict[str, str]) -> float:
    started = time.perf_counter()
    target, extra = IMAGES[image]
    args = [f"--build-arg={k}={v}" for k, v in {**pip, "BASE": base, "MODELS": "context", **extra}.items()]
    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():  # the host's CA bundle, for indexes behind a proxy with its own CA
        args.append(f"--secret=id=pip_cert,src={cert}")
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    sh(docker(), "build", "--network", "host", "--target", target, "-t", f"resnet-serve:{image}", *args, str(ROOT),
       env=env)
    return round(time.perf_counter() - started, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def inspect(container: str, template: str) -> str:
    return sh(docker(), "inspect", "-f", template, container, capture=True).stdout.strip()


def started_at(container: str) -> float:
    """When the container's process started (Docker's RFC 3339 time, nanoseconds cut to micro)."""
    import datetime

    stamp = inspect(container, "{{.State.StartedAt}}").rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    moment = datetime.datetime.fromisoformat(f"{whole}.{(fraction + '000000')[:6]}").replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def rss_mb(container: str) -> float:
    pid = inspect(container, "{{.State.Pid}}")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


async def burst_during_stop(url: str, container: str, images: list[bytes], count: int = 16) -> list[int | str]:
    """``count`` uploads in flight, then ``docker stop``: every accepted one must be answered."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(i: int) -> int | str:
            try:
                files = {"file": ("p.jpg", images[i % len(images)] + os.urandom(8), "image/jpeg")}
                return (await client.post("/predict", files=files)).status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        for _ in range(500):  # until the server holds them all (its in-flight gauge)
            text = (await client.get("/metrics")).text
            held = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("resnet_serve_in_flight{"))
            if held >= count or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        stop = asyncio.create_task(asyncio.to_thread(sh, docker(), "stop", "--time", "30", container))
        outcomes = await asyncio.gather(*tasks)
        await stop
    return outcomes


def check_image(image: str, images: list[bytes]) -> dict[str, object]:
    """Run the image on the host network and check it as the issue asks; what it measured."""
    port, name = free_port(), f"resnet-serve-check-{image}"
    sh(docker(), "rm", "-f", name, check=False, capture=True)
    called = time.time()
    sh(docker(), "run", "-d", "--name", name, "--network", "host", "-e", "RESNET_SERVE_HOST=127.0.0.1",
       "-e", f"RESNET_SERVE_PORT={port}", f"resnet-serve:{image}")
    url = f"http://127.0.0.1:{port}"
    try:
        ready = healthy = None
        for attempt in range(24000):
            # Until ready: a bare HTTP probe every 10 ms, and docker inspect (a CLI process per
            # call) only every 0.5 s, to take little CPU from the start being timed.
            if ready is None and is_ready(url):
                ready = time.time()
            if (ready is not None or attempt % 50 == 0) and inspect(name, "{{.State.Health.Status}}") == "healthy":
                healthy = time.time()
                break
            if attempt % 50 == 0 and inspect(name, "{{.State.Running}}") != "true":
                raise SystemExit(sh(docker(), "logs", name, capture=True).stdout[-3000:])
            time.sleep(0.01 if ready is None else 0.1)
        else:
            raise SystemExit(f"{image} never became healthy")
        began = started_at(name)  # the container's process start: vfs copies the image before it
        answers = [httpx.post(f"{url}/predict", files={"file": ("p.jpg", data, "image/jpeg")}, timeout=60) for data in images]
        assert all(a.status_code == 200 and a.json()["predictions"] for a in answers), [a.text for a in answers]
        model = httpx.get(f"{url}/model", timeout=10).json()
        assert model["runtime"] == SERVES[image], model
        uid = sh(docker(), "exec", name, "id", "-u", capture=True).stdout.strip()
        assert uid != "0", "the server runs as root"
        for _ in range(4):  # some load, then the resident set
            asyncio.run(_load(url, images))
        rss = rss_mb(name)
        why = httpx.post(f"{url}/explain", files={"file": ("p.jpg", images[0], "image/jpeg")}, timeout=60)
        assert why.status_code == 200 and why.json()["explanations"], why.text
        explained_rss = rss_mb(name)
        outcomes = asyncio.run(burst_during_stop(url, name, images))
        exit_code = inspect(name, "{{.State.ExitCode}}")
        assert set(outcomes) <= {200}, f"requests accepted before the stop were lost: {outcomes}"
        if exit_code != "0":
            log = sh(docker(), "logs", "--timestamps", name, check=False, capture=True)
            kept = BUILD / f"{name}.log"
            kept.write_text(log.stdout + log.stderr)
            raise SystemExit(f"exit code {exit_code} after docker stop; the container's log: {kept}")
    finally:
        sh(docker(), "rm", "-f", name, check=False, capture=True)
    size = int(sh(docker(), "image", "inspect", "-f", "{{.Size}}", f"resnet-serve:{image}", capture=True).stdout)
    assert ready is not None and healthy is not None
    return {"image_mb": round(size / 1e6, 1), "run_to_start_s": round(began - called, 2),
            "start_to_ready_s": round(ready - began, 2), "start_to_healthy_s": round(healthy - began, 2),
            "rss_after_load_mb": rss, "explain": why.json()["method"], "rss_after_explain_mb": explained_rss,
            "uid": uid, "runtime": model["runtime"], "precision": model["precision"],
            "weights": model["weights"], "burst_during_stop": {str(k): outcomes.count(k) for k in set(outcomes)},
            "exit_code": int(exit_code)}


async def _load(url: str, images: list[bytes], concurrency: int = 8) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(client.post("/predict", files={"file": ("p.jpg", images[i % len(images)] + os.urandom(8))})
                               for i in range(concurrency * 4)))


def compose_with_locust(images: list[bytes]) -> str:
    """docker compose: the service (slim) and the locust profile, headless, on the host network."""
    folder = BUILD / "bench-images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(images):
        (folder / f"{i}.jpg").write_bytes(data)
    env = {**os.environ, "BENCH_IMAGES": str(folder), "LOCUST_DURATION": "15s", "RESNET_SERVE_PORT": str(free_port())}
    compose = ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--profile", "load"]
    try:  # the images are this check's own builds (BuildKit); compose only runs them
        run = sh(*compose, "up", "--no-build", "--no-color", "--abort-on-container-exit", "--exit-code-from", "locust",
                 capture=True, env=env, timeout=900)
    finally:
        sh(*compose, "down", "--remove-orphans", check=False, capture=True, env=env)
    stats = [line.split("|", 1)[1].strip() for line in run.stdout.splitlines()
             if line.startswith("locust") and "|" in line and ("/predict" in line or "Aggregated" in line)]
    return "\n".join(stats[-4:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-torch", action="store_true", help="build and check the torch-free images only")
    parser.add_argument("--weights", choices=["random", "official"], default="random",
                        help="weights of the exported model (official needs the file or a download)")
    args = parser.parse_args(argv)
    ensure_engine()
    base = base_image()
    export_models(args.weights)
    served = ["slim", "openvino"] if args.skip_torch else ["slim", "openvino", "torch"]
    with loopback_indexes() as pip:
        build_s = {image: build(image, base, pip) for image in [*served, "load"]}
    # vfs keeps every layer whole: the build cache and the images these builds replaced would
    # fill a disk after a few runs
    sh(docker(), "builder", "prune", "--all", "--force", capture=True)
    sh(docker(), "image", "prune", "--force", capture=True)
    images = default_images()  # the benchmarks' photos: scikit-image's, as JPEGs
    report = {image: {"build_s": build_s[image], **check_image(image, images)} for image in served}
    locust = compose_with_locust(images) if shutil.which("docker-compose") else "docker-compose is not installed"
    lines = ["| image | size MB | docker run to start s | start to ready s | start to healthy s | RSS after load MB "
             "| /explain (RSS after) | user | runtime | burst during docker stop | exit code |",
             "|---|---:|---:|---:|---:|---:|---|---|---|---|---:|"]
    for t, r in report.items():
        lines.append(f"| resnet-serve:{t} | {r['image_mb']} | {r['run_to_start_s']} | {r['start_to_ready_s']} | "
                     f"{r['start_to_healthy_s']} | {r['rss_after_load_mb']} | {r['explain']} "
                     f"({r['rss_after_explain_mb']} MB) | {r['uid']} | {r['runtime']} "
                     f"{r['precision']} | {r['burst_during_stop']} | {r['exit_code']} |")
    lines += ["", "docker compose --profile load (locust, 15 s):", "", locust, ""]
    publish(RESULTS / "docker_check", lines, f"Base image: {base}", {"base": base, "images": report, "locust": locust})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
