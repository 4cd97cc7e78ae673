"""Closed-loop HTTP load generator for resnet-serve.

Each of C workers sends one real JPEG, waits for the answer, and sends the next, for D seconds.
It reports throughput and latency percentiles per concurrency, plus the in-process time of
decode + pre-process + one forward pass at batch 1 (measured first, with no server running),
so the server's own overhead at idle can be read off one table.

    python benchmarks/http_bench.py --spawn --concurrency 1 8 32 --duration 15
    python benchmarks/http_bench.py --url http://127.0.0.1:8000 --images ~/photos

Writes ``benchmarks/results/http_bench.json`` and ``.md`` (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    statuses: dict[str, int]
    mean_batch_size: float


def default_images() -> list[bytes]:
    """Real photos from scikit-image (a dev dependency), as JPEGs."""
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    images = []
    for name in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png"):
        buffer = io.BytesIO()
        Image.open(data / name).convert("RGB").save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def folder_images(folder: Path) -> list[bytes]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    if not files:
        raise SystemExit(f"no images in {folder}")
    return [p.read_bytes() for p in files]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def unique(data: bytes) -> bytes:
    """The same image with a random trailer: decoders ignore it, the result cache cannot hit."""
    return data + os.urandom(16)


async def run_load(url: str, images: list[bytes], concurrency: int, duration: float,
                   repeat: bool = False) -> LoadResult:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    batch_sizes: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        end = time.perf_counter() + duration

        async def worker(index: int) -> None:
            i = index
            while time.perf_counter() < end:
                data = images[i % len(images)] if repeat else unique(images[i % len(images)])
                i += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", files={"file": ("image.jpg", data, "image/jpeg")})
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    batch_sizes.append(response.json()["batch_size"])

        began = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - began
    ok = statuses.get("200", 0)
    return LoadResult(
        concurrency=concurrency,
        duration_s=round(elapsed, 2),
        requests=sum(statuses.values()),
        throughput_rps=round(ok / elapsed, 2),
        p50_ms=round(percentile(latencies, 50), 2),
        p90_ms=round(percentile(latencies, 90), 2),
        p99_ms=round(percentile(latencies, 99), 2),
        statuses=dict(statuses),
        mean_batch_size=round(statistics.fmean(batch_sizes), 2) if batch_sizes else 0.0,
    )


def in_process_ms(images: list[bytes], repeats: int) -> dict[str, float]:
    """p50 of decode+pre-process and of one batch-1 forward pass, in this process."""
    from resnet_serve.engine import Engine
    from resnet_serve.preprocess import preprocess
    from resnet_serve.settings import Settings
    from resnet_serve.weights import RESNET18, resolve

    settings = Settings()
    engine = Engine.load(RESNET18, resolve(RESNET18, settings), settings)
    pre, infer = [], []
    try:
        for i in range(repeats):
            start = time.perf_counter()
            tensor = preprocess(images[i % len(images)], RESNET18, max_pixels=settings.max_pixels).tensor
            pre.append((time.perf_counter() - start) * 1000)
            infer.append(asyncio.run(engine.predict([tensor]))[0].inference_ms)
    finally:
        engine.close()
    return {
        "preprocess_p50_ms": round(statistics.median(pre), 2),
        "inference_p50_ms": round(statistics.median(infer), 2),
        "total_p50_ms": round(statistics.median(p + i for p, i in zip(pre, infer)), 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def spawned_server(extra_env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``resnet-serve serve`` on a free loopback port and wait until it is ready."""
    port = free_port()
    env = {**os.environ, **extra_env}
    process = subprocess.Popen(
        [sys.executable, "-m", "resnet_serve", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit("the server exited during start-up")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise SystemExit("the server never became ready")
        yield url, process
    finally:
        process.terminate()
        process.wait(60)


def markdown(results: list[LoadResult], baseline: dict[str, float] | None) -> str:
    lines = [
        "| concurrency | requests | throughput (img/s) | p50 (ms) | p90 (ms) | p99 (ms) | mean batch | statuses |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
        lines.append(
            f"| {r.concurrency} | {r.requests} | {r.throughput_rps} | {r.p50_ms} | {r.p90_ms} | "
            f"{r.p99_ms} | {r.mean_batch_size} | {statuses} |"
        )
    if baseline:
        lines.append("")
        lines.append(
            f"In-process, batch 1 (p50): decode+pre-process {baseline['preprocess_p50_ms']} ms, "
            f"inference {baseline['inference_p50_ms']} ms, together {baseline['total_p50_ms']} ms."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--spawn", action="store_true", help="start `resnet-serve serve` (env settings apply)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--images", type=Path, help="a folder of JPEG/PNG files (default: scikit-image photos)")
    parser.add_argument("--baseline-repeats", type=int, default=50, help="0 skips the in-process baseline")
    parser.add_argument("--out", default="http_bench", help="file stem under benchmarks/results/")
    args = parser.parse_args(argv)

    images = folder_images(args.images) if args.images else default_images()
    baseline = in_process_ms(images, args.baseline_repeats) if args.baseline_repeats else None
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(spawned_server({}))[0] if args.spawn else args.url
        asyncio.run(run_load(url, images, max(args.concurrency), args.warmup))
        results = [asyncio.run(run_load(url, images, c, args.duration)) for c in args.concurrency]
        model = httpx.get(f"{url}/model", timeout=10).json()

    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "server": {k: model[k] for k in ("device", "precision", "max_batch_size", "max_wait_ms", "dispatch",
                                          "torch_threads", "weights")},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "in_process": baseline,
        "results": [asdict(r) for r in results],
    }
    table = markdown(results, baseline)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
