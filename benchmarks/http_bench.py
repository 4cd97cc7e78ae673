"""Closed-loop HTTP load generator for resnet-serve.

Each of C workers sends one real JPEG, waits for the answer, and sends the next, for D seconds.
Every upload gets a random trailer, so the result cache never answers (``--repeat`` turns that
off to measure the cache). It reports throughput and latency percentiles per concurrency, and
the in-process figures for the same settings (measured first, with no server running): the time
of decode + pre-process + one forward pass at batch 1, and the throughput of decode + inference
in batches, so the server's own overhead reads off one table.

    python benchmarks/http_bench.py --spawn --concurrency 1 8 32 --duration 15
    python benchmarks/http_bench.py --spawn --configs naive default fastest --concurrency 1 32
    python benchmarks/http_bench.py --url http://127.0.0.1:8000 --images ~/photos

With several ``--configs`` the servers run one after another in the same invocation and the
summary gives ratios (fastest/naive throughput, server/in-process), so drift on a shared machine
largely cancels. ``slim-ort-int8`` is served by the slim install (``pip install .`` at
``.venv-slim``, made if missing), the others by this environment.

Writes ``benchmarks/results/http_bench.json`` and ``.md`` (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from images import default_images, folder_images  # noqa: E402
from machine import describe, one_line, write_results  # noqa: E402
from venvs import torch_free_python  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# Server configurations, as RESNET_SERVE_* overrides on top of the environment.
CONFIGS: dict[str, dict[str, str]] = {
    "env": {},
    "default": {},
    # naive and fastest are TorchScript's settings (channels-last, the INT8 backend): pinned to it,
    # since RESNET_SERVE_RUNTIME=auto might serve ONNX Runtime instead
    "naive": {"RESNET_SERVE_RUNTIME": "torchscript", "RESNET_SERVE_MAX_BATCH_SIZE": "1",
              "RESNET_SERVE_PRECISION": "fp32", "RESNET_SERVE_CHANNELS_LAST": "false", "RESNET_SERVE_CACHE_SIZE": "0"},
    "fastest": {"RESNET_SERVE_RUNTIME": "torchscript", "RESNET_SERVE_PRECISION": "int8",
                "RESNET_SERVE_INT8_BACKEND": "onednn", "RESNET_SERVE_MAX_BATCH_SIZE": "8"},
    # ONNX Runtime's intra-op threads sleeping (the default) or spinning between parallel sections
    **{f"ort-{precision}{spin}": {"RESNET_SERVE_RUNTIME": "onnxruntime", "RESNET_SERVE_PRECISION": precision,
                                  "RESNET_SERVE_ORT_SPINNING": str(bool(spin)).lower()}
       for precision in ("int8", "fp32") for spin in ("", "-spinning")},
    # INT8 on each CPU runtime with the service's defaults (issue 12's speed target: ONNX Runtime,
    # and OpenVINO, against TorchScript, in interleaved rounds)
    **{f"{short}-int8": {"RESNET_SERVE_RUNTIME": runtime, "RESNET_SERVE_PRECISION": "int8"}
       for short, runtime in (("ts", "torchscript"), ("ov", "openvino"))},
    # the slim install's server (``pip install .``, no torch; SLIM), what issue 12 compares with
    # ts-int8; downloads off, so it serves the built-in model as the full install exported it
    "slim-ort-int8": {"RESNET_SERVE_RUNTIME": "onnxruntime", "RESNET_SERVE_PRECISION": "int8",
                      "RESNET_SERVE_ALLOW_DOWNLOAD": "false"},
    # the same with two instances: two batches at once, one ONNX Runtime thread each
    "slim-ort-int8-2i": {"RESNET_SERVE_RUNTIME": "onnxruntime", "RESNET_SERVE_PRECISION": "int8",
                         "RESNET_SERVE_ALLOW_DOWNLOAD": "false", "RESNET_SERVE_INSTANCES": "2"},
    "slim-ort-int8-2i-4t": {"RESNET_SERVE_RUNTIME": "onnxruntime", "RESNET_SERVE_PRECISION": "int8",
                            "RESNET_SERVE_ALLOW_DOWNLOAD": "false", "RESNET_SERVE_INSTANCES": "2",
                            "RESNET_SERVE_ORT_THREADS": "4"},
    "ts-int8-2i": {"RESNET_SERVE_RUNTIME": "torchscript", "RESNET_SERVE_PRECISION": "int8",
                   "RESNET_SERVE_INSTANCES": "2"},
}
SLIM = {"slim-ort-int8", "slim-ort-int8-2i", "slim-ort-int8-2i-4t"}  # served by the torch-free virtualenv (venvs.torch_free_python)


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
    server_p50_ms: float = float("nan")
    cached_share: float = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def unique(data: bytes) -> bytes:
    """The same image with a random trailer: decoders ignore it, the result cache cannot hit."""
    return data + os.urandom(16)


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: the load generator shares the
    machine with the server, so every microsecond it spends is taken from what it measures."""

    BOUNDARY = b"resnetservebench"

    def __init__(self, host: str, port: int, path: str = "/predict") -> None:
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request(self, image: bytes) -> bytes:
        body = (b"--" + self.BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="i.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--" + self.BOUNDARY + b"--\r\n")
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: multipart/form-data; boundary={self.BOUNDARY.decode()}\r\n\r\n").encode()
        return head + body

    async def post(self, image: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.request(image))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lowered = head.lower()
        start = lowered.index(b"content-length:") + 15
        length = int(lowered[start : lowered.index(b"\r\n", start)])
        body = await self.reader.readexactly(length)
        if b"connection: close" in lowered:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def run_load(url: str, images: list[bytes], concurrency: int, duration: float,
                   repeat: bool = False, client: str = "raw", model: str | None = None) -> LoadResult:
    """``concurrency`` closed-loop clients for ``duration`` seconds (``model``: ``?model=`` of a
    repository server)."""
    path = f"/predict?model={model}" if model else "/predict"
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    batch_sizes: list[int] = []
    server_ms: list[float] = []
    cached = 0
    host, port = url.removeprefix("http://").rsplit(":", 1)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        end = time.perf_counter() + duration

        async def send(connection: RawConnection, data: bytes) -> tuple[int, bytes]:
            if client == "raw":
                return await asyncio.wait_for(connection.post(data), 30)
            response = await http.post(path, files={"file": ("image.jpg", data, "image/jpeg")})
            return response.status_code, response.content

        async def worker(index: int) -> None:
            connection = RawConnection(host, int(port), path)
            i = index
            while time.perf_counter() < end:
                data = images[i % len(images)] if repeat else unique(images[i % len(images)])
                i += 1
                start = time.perf_counter()
                try:
                    status, body = await send(connection, data)
                except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    statuses[type(exc).__name__] += 1
                    await connection.close()
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                statuses[str(status)] += 1
                if status == 200:
                    nonlocal cached
                    answer = json.loads(body)
                    batch_sizes.append(answer["batch_size"])
                    server_ms.append(answer["total_time_ms"])
                    cached += answer.get("cached", False)
            await connection.close()

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
        server_p50_ms=round(percentile(server_ms, 50), 3),
        cached_share=round(cached / ok, 3) if ok else 0.0,
    )


def in_process_ms(images: list[bytes], repeats: int, overrides: dict[str, str] | None = None) -> dict[str, float]:
    """With no server: p50 of decode+pre-process and of a batch-1 forward pass, and the
    throughput of decode + inference in full batches, for the given settings."""
    from resnet_serve.loading import open_model
    from resnet_serve.settings import Settings
    from resnet_serve.transform import preprocess

    fields = {k.removeprefix("RESNET_SERVE_").lower(): v for k, v in (overrides or {}).items()}
    settings = Settings(**fields)  # type: ignore[arg-type]
    engine = open_model(settings)
    spec = engine.info.spec
    n = settings.max_batch_size

    async def measure() -> tuple[list[float], list[float], float]:
        """On one event loop, as in the server; decode and inference take turns (no overlap)."""
        pre, infer = [], []
        for i in range(repeats):
            start = time.perf_counter()
            tensor = preprocess(images[i % len(images)], spec, max_pixels=settings.max_pixels).pixels
            pre.append((time.perf_counter() - start) * 1000)
            infer.append((await engine.predict([tensor]))[0].inference_ms)
        start = time.perf_counter()
        done = 0
        while done < repeats:
            batch = [preprocess(images[(done + j) % len(images)], spec, max_pixels=settings.max_pixels).pixels
                     for j in range(n)]
            await engine.predict(batch)
            done += n
        return pre, infer, done / (time.perf_counter() - start)

    try:
        pre, infer, throughput = asyncio.run(measure())
    finally:
        engine.close()
    return {
        "preprocess_p50_ms": round(statistics.median(pre), 2),
        "inference_p50_ms": round(statistics.median(infer), 2),
        "total_p50_ms": round(statistics.median(p + i for p, i in zip(pre, infer)), 2),
        "batched_images_per_s": round(throughput, 2),
        "batch_size": n,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_ready(url: str) -> bool:
    """Whether ``url``'s readiness probe answers 200. A bare ``http.client`` request, like a
    kubelet's probe, and cheaper per poll than a new ``httpx.Client`` (which builds a TLS
    context); ``start_bench.py --httpx-probe`` compares the two on whole starts."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=1)
    try:
        connection.request("GET", "/health/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@functools.cache
def slim_python() -> Path:
    """The slim install's python, this checkout installed into it once per run, not per round."""
    return torch_free_python()


@contextlib.contextmanager
def spawned_server(extra_env: dict[str, str], python: Path | str = sys.executable
                   ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``resnet-serve serve`` on a free loopback port and wait until it is ready."""
    port = free_port()
    env = {**os.environ, **extra_env}
    process = subprocess.Popen(
        [str(python), "-m", "resnet_serve", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit("the server exited during start-up")
            if is_ready(url):
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
        "| concurrency | requests | throughput (img/s) | p50 (ms) | p90 (ms) | p99 (ms) | server p50 (ms) | mean batch | cached | statuses |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
        lines.append(
            f"| {r.concurrency} | {r.requests} | {r.throughput_rps} | {r.p50_ms} | {r.p90_ms} | "
            f"{r.p99_ms} | {r.server_p50_ms} | {r.mean_batch_size} | {r.cached_share:.0%} | {statuses} |"
        )
    if baseline:
        lines.append("")
        lines.append(
            f"In-process, batch 1 (p50): decode+pre-process {baseline['preprocess_p50_ms']} ms, "
            f"inference {baseline['inference_p50_ms']} ms, together {baseline['total_p50_ms']} ms; "
            f"decode + inference in batches of {baseline['batch_size']}: {baseline['batched_images_per_s']} img/s."
        )
    return "\n".join(lines)


def ratios(runs: dict[str, dict[str, object]]) -> dict[str, float]:
    """The comparisons the targets are stated in, from runs made in one invocation."""
    def top(name: str) -> dict[str, object]:
        return max(runs[name]["results"], key=lambda r: r["concurrency"])  # type: ignore[arg-type, return-value]

    def at(name: str, c: int) -> dict[str, object] | None:
        return next((r for r in runs[name]["results"] if r["concurrency"] == c), None)  # type: ignore[union-attr]

    out: dict[str, float] = {}
    if "fastest" in runs and "naive" in runs:
        out["fastest_vs_naive_throughput"] = round(top("fastest")["throughput_rps"] / top("naive")["throughput_rps"], 2)  # type: ignore[operator]
    for precision in ("int8", "fp32"):
        sleeping, spinning = f"ort-{precision}", f"ort-{precision}-spinning"
        if sleeping in runs and spinning in runs:
            out[f"{sleeping}_sleeping_vs_spinning_throughput"] = round(
                top(sleeping)["throughput_rps"] / top(spinning)["throughput_rps"], 2)  # type: ignore[operator]
    pairs = [(name, "ts-int8") for name in ("ort-int8", "ov-int8", "slim-ort-int8", "slim-ort-int8-2i")]
    pairs += [("slim-ort-int8-2i", "ts-int8-2i"), ("ts-int8-2i", "ts-int8"), ("slim-ort-int8-2i", "slim-ort-int8")]
    for name, against in pairs:  # issue 12's ratio, and two instances against one, like for like
        if name in runs and against in runs:
            out[f"{name}_vs_{against}_throughput"] = round(
                top(name)["throughput_rps"] / top(against)["throughput_rps"], 2)  # type: ignore[operator]
    for name, run in runs.items():
        baseline = run.get("in_process")
        if not baseline:
            continue
        out[f"{name}_server_vs_in_process_throughput"] = round(
            top(name)["throughput_rps"] / baseline["batched_images_per_s"], 2)  # type: ignore[index, operator]
        single = at(name, 1)
        if single:
            out[f"{name}_c1_p50_vs_in_process_single"] = round(single["p50_ms"] / baseline["total_p50_ms"], 2)  # type: ignore[index, operator]
    return out


def median_ratios(per_round: list[dict[str, float]]) -> dict[str, float]:
    """Each ratio's median over interleaved rounds: one noisy round cannot decide a target."""
    return {key: round(statistics.median(r[key] for r in per_round), 2) for key in per_round[0]}


def median_table(rounds: list[dict[str, dict[str, object]]]) -> str:
    """One row per configuration and concurrency: the median over rounds of each figure."""
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    lines = ["| config | concurrency | throughput (img/s) | p50 (ms) | p99 (ms) | mean batch | "
             "in-process one image (ms) | in-process batched (img/s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        baselines = [run["in_process"] for run in runs if run["in_process"]]
        single = med([b["total_p50_ms"] for b in baselines]) if baselines else "-"  # type: ignore[index]
        batched = med([b["batched_images_per_s"] for b in baselines]) if baselines else "-"  # type: ignore[index]
        for i, first in enumerate(runs[0]["results"]):  # type: ignore[arg-type]
            rows = [run["results"][i] for run in runs]  # type: ignore[index]
            lines.append(f"| {name} | {first['concurrency']} | {med([r['throughput_rps'] for r in rows])} | "
                         f"{med([r['p50_ms'] for r in rows])} | {med([r['p99_ms'] for r in rows])} | "
                         f"{med([r['mean_batch_size'] for r in rows])} | {single} | {batched} |")
    return "\n".join(lines)


def measure_round(args: argparse.Namespace, images: list[bytes]) -> dict[str, dict[str, object]]:
    """Each configuration once: its in-process baseline, then its server under load."""
    runs: dict[str, dict[str, object]] = {}
    for name in args.configs:
        overrides = CONFIGS[name]
        baseline = in_process_ms(images, args.baseline_repeats, overrides) if args.baseline_repeats else None
        with contextlib.ExitStack() as stack:
            python = slim_python() if name in SLIM else sys.executable
            url = stack.enter_context(spawned_server(overrides, python))[0] if args.spawn else args.url
            asyncio.run(run_load(url, images, max(args.concurrency), args.warmup, args.repeat, args.client))
            results = [asyncio.run(run_load(url, images, c, args.duration, args.repeat, args.client))
                       for c in args.concurrency]
            model = httpx.get(f"{url}/model", timeout=10).json()
        runs[name] = {
            "overrides": overrides,
            "server": {k: model.get(k) for k in ("runtime", "device", "precision", "channels_last", "max_batch_size",
                                                  "max_wait_ms", "dispatch", "threads", "cache_size", "weights")},
            "in_process": baseline,
            "results": [asdict(r) for r in results],
        }
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--spawn", action="store_true", help="start `resnet-serve serve` (env settings apply)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["env"],
                        help="server configurations to run one after another (with --spawn)")
    parser.add_argument("--repeat", action="store_true", help="send identical bytes (measures the cache)")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="raw: a lean keep-alive HTTP/1.1 client (default); httpx: the usual client")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--images", type=Path, help="a folder of JPEG/PNG files (default: scikit-image photos)")
    parser.add_argument("--baseline-repeats", type=int, default=50, help="0 skips the in-process baseline")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, interleaved; ratios are medians")
    parser.add_argument("--out", default="http_bench", help="file stem under benchmarks/results/")
    args = parser.parse_args(argv)

    if args.url and args.configs != ["env"]:
        parser.error("--configs needs --spawn: each configuration is a server of its own")
    images = folder_images(args.images) if args.images else default_images()
    rounds = [measure_round(args, images) for _ in range(args.rounds)]
    per_round = [ratios(runs) for runs in rounds]
    summary = median_ratios(per_round)
    sections = []
    for i, runs in enumerate(rounds, 1):
        if len(rounds) > 1:
            sections.append(f"### Round {i} of {len(rounds)}")
        for name, run in runs.items():
            server = run["server"]
            sections.append(f"**{name}** ({', '.join(f'{k}={v}' for k, v in server.items())})\n\n"  # type: ignore[union-attr]
                            + markdown([LoadResult(**r) for r in run["results"]], run["in_process"]))  # type: ignore[arg-type, union-attr]
    if len(rounds) > 1:
        sections.append(f"### Median of {len(rounds)} rounds\n\n" + median_table(rounds))
    if summary:
        label = "Ratios" if len(rounds) == 1 else f"Ratios (median of {len(rounds)} rounds)"
        lines = [f"- {k} = {v}" + (f" (rounds: {', '.join(str(r[k]) for r in per_round)})" if len(rounds) > 1 else "")
                 for k, v in summary.items()]
        sections.append(f"{label}:\n\n" + "\n".join(lines))
    machine = describe()
    sections.append(f"Machine: {one_line(machine)}; client: {args.client}.")
    text = "\n\n".join(sections)
    print(text)
    report = {
        "machine": machine,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "client": args.client,
        "rounds": rounds,
        "ratios_per_round": per_round,
        "ratios": summary,
    }
    write_results(RESULTS / args.out, report, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
