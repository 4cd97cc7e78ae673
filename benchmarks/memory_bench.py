"""Memory, start time and speed of each way to serve the same model, in one run on one machine.

    python benchmarks/memory_bench.py [--duration 60] [--concurrency 32]
        [--slim-python .venv-slim/bin/python] [--openvino-python .venv-openvino/bin/python]
        [--baseline-src DIR] [--starts 5] [--explain]

One repository is exported first (ResNet-18, random-init weights, TorchScript and ONNX in the
``--precisions``, FP32 and INT8 by default; speed and memory do not depend on the weight values). Then each configuration is a fresh
server process:

- ``slim onnxruntime fp32`` / ``slim onnxruntime int8``: the slim install (``pip install .``, no
  torch), ONNX Runtime; its virtualenv is made at ``.venv-slim`` if ``--slim-python`` is not given
- ``slim+openvino openvino fp32`` / ``... int8`` / ``... bf16``: ``pip install '.[openvino]'`` (no
  torch either), OpenVINO serving the same ONNX artefacts (BF16: the FP32 graph, run in BF16);
  made at ``.venv-openvino`` if ``--openvino-python`` is not given
- ``full torchscript fp32`` / ``full torchscript int8``: this environment (the torch extra)
- ``full auto fp32`` / ``full auto int8``: this environment with ``RESNET_SERVE_RUNTIME=auto``, what
  ``make run`` serves: the first start times TorchScript, ONNX Runtime and OpenVINO (if installed)
  and keeps the choice, the later ones open the chosen runtime only
- ``baseline torchscript fp32``: ``--baseline-src``, another source tree (the commit before this
  work, say) served by this environment from its own compiled-model cache, warmed first

For each: the first start (process start to the first 200 from ``/health/ready``, artefacts
built; it fills the runtime's caches; and its RSS 2 s after), then ``--starts`` more, timed the same way (start to
ready: their median, and their range), idle RSS 2 s after the last is ready, peak RSS
(``VmHWM``, from the start) after ``--duration`` seconds of closed-loop load at
``--concurrency`` (unique uploads, so the result cache never answers), requests per second and
p50; with ``--explain``, one ``POST /explain`` after the load and the RSS after it (once the
heap trimmer ran). Writes ``benchmarks/results/memory_bench.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

import resnet_serve
from resnet_serve.memory import TRIM_INTERVAL_S

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS, free_port, is_ready, run_load  # noqa: E402
from images import default_images  # noqa: E402
from machine import describe, one_line, write_results  # noqa: E402
from venvs import torch_free_python  # noqa: E402

ROOT = Path(__file__).parent.parent


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def export_repository(folder: Path, precisions: list[str]) -> Path:
    from resnet_serve.cli import main

    common = ["export", "--weights", "random", "--repository", str(folder), "--version", "1"]
    graphs = [p for p in precisions if p != "bf16"] + (["fp32"] if "bf16" in precisions else [])  # OpenVINO's BF16
    if main([*common, "--format", "torchscript,onnx", "--precision", ",".join(dict.fromkeys(graphs))]):
        raise SystemExit("the export failed")
    if "bf16" in precisions and main([*common, "--format", "torchscript", "--precision", "bf16"]):
        raise SystemExit("the export failed")
    return folder


def httpx_probe(url: str) -> bool:
    """The probe these benchmarks used before ``is_ready``: a new httpx client per call."""
    try:
        return httpx.get(f"{url}/health/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def start(command: list[str], env: dict[str, str], probe: Callable[[str], bool] = is_ready,
          interval: float = 0.01) -> tuple[subprocess.Popen[bytes], str, float]:
    """A server process, once ready: its URL and the seconds from its start to its first 200,
    polled by ``probe`` every ``interval`` seconds."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    process = subprocess.Popen([*command, "--port", str(port), "--log-level", "warning"], env=env)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{command} exited during start-up")
        if probe(url):
            return process, url, time.perf_counter() - started
        time.sleep(interval)


def measure(command: list[str], env: dict[str, str], duration: float, concurrency: int,
            starts: int = 1, explain: bool = False) -> dict[str, object]:
    """Start the server once to fill its caches (the runtime choice, ONNX Runtime's optimised
    graph), then ``starts`` more times, timed to ready (the median is reported: one start on a
    shared 2-core machine varies by ±0.2 s); load the last one; RSS before and after; with
    ``explain``, then one ``POST /explain`` and the RSS after it (what explaining loads)."""
    first, _, cold_s = start(command, env)
    time.sleep(2)
    first_kb = status_kb(first.pid, "VmRSS")
    first.terminate()
    first.wait(60)
    ready_times = []
    for _ in range(starts - 1):
        warm, _, ready_s = start(command, env)
        ready_times.append(ready_s)
        warm.terminate()
        warm.wait(60)
    process, url, ready_s = start(command, env)
    ready_times.append(ready_s)
    try:
        time.sleep(2)
        idle_kb = status_kb(process.pid, "VmRSS")
        model = httpx.get(f"{url}/model", timeout=10).json()
        result = asyncio.run(run_load(url, default_images(), concurrency, duration))
        peak_kb = status_kb(process.pid, "VmHWM")
        explained = explain_once(url, process.pid) if explain else {}
    finally:
        process.terminate()
        process.wait(60)
    return {"first_start_s": round(cold_s, 2), "first_start_rss_mb": round(first_kb / 1024, 1),
            "start_to_ready_s": round(statistics.median(ready_times), 2),
            "start_to_ready_all_s": [round(t, 2) for t in ready_times], "idle_rss_mb": round(idle_kb / 1024, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1), "rps": result.throughput_rps, "p50_ms": result.p50_ms,
            "statuses": result.statuses, "runtime": model.get("runtime", "torchscript"),
            "precision": model.get("precision"), **explained}


def explain_once(url: str, pid: int) -> dict[str, object]:
    """One explanation of a photo; how it was made, and the server's RSS after it, once the heap
    trimmer has run (``memory.TRIM_INTERVAL_S``)."""
    answer = httpx.post(f"{url}/explain", files={"file": ("photo.jpg", default_images()[0], "image/jpeg")}, timeout=60)
    method = answer.json().get("method") if answer.status_code == 200 else f"HTTP {answer.status_code}"
    time.sleep(TRIM_INTERVAL_S + 1)
    return {"explain_method": method, "explain_rss_mb": round(status_kb(pid, "VmRSS") / 1024, 1)}


def compile_sources(*folders: Path) -> None:
    """Bytecode for source trees served from ``PYTHONPATH``, as ``pip install`` writes for the
    slim one: with ``PYTHONDONTWRITEBYTECODE`` set, every start would compile them again (~0.1 s)."""
    for folder in folders:
        compileall.compile_dir(folder, quiet=1)


def configurations(args: argparse.Namespace, repository: Path, scratch: Path) -> dict[str, tuple[list[str], dict]]:
    compile_sources(Path(resnet_serve.__file__).parent, *([args.baseline_src] if args.baseline_src else []))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
    base.update(pair.split("=", 1) for pair in args.env)  # type: ignore[arg-type]
    served = {**base, "RESNET_SERVE_MODEL_REPOSITORY": str(repository), "RESNET_SERVE_CACHE_SIZE": "0",
              "RESNET_SERVE_COMPILED_CACHE_DIR": str(scratch / "cache"), "RESNET_SERVE_DEVICE": "cpu"}
    slim = [str(args.slim_python or torch_free_python()), "-m", "resnet_serve", "serve"]
    openvino = [str(args.openvino_python or torch_free_python("openvino")), "-m", "resnet_serve", "serve"]
    full = [sys.executable, "-m", "resnet_serve", "serve"]
    configs = {
        f"{install} {runtime} {precision}": (command, {**served, "RESNET_SERVE_RUNTIME": runtime,
                                                       "RESNET_SERVE_PRECISION": precision})
        for install, runtime, command in (("slim", "onnxruntime", slim), ("slim+openvino", "openvino", openvino),
                                          ("full", "torchscript", full), ("full", "auto", full))
        for precision in args.precisions if not (runtime == "onnxruntime" and precision == "bf16")
    }
    if args.baseline_src:
        configs["baseline torchscript fp32"] = (full, {
            **base, "PYTHONPATH": str(args.baseline_src), "RESNET_SERVE_WEIGHTS_MODE": "random",
            "RESNET_SERVE_CACHE_SIZE": "0", "RESNET_SERVE_COMPILED_CACHE_DIR": str(scratch / "baseline"),
            "RESNET_SERVE_PRECISION": "fp32", "RESNET_SERVE_DEVICE": "cpu"})
    return configs


def plot(report: dict[str, dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    fig, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4))
    positions = range(len(names))
    memory.barh([p + 0.2 for p in positions], [report[n]["peak_rss_mb"] for n in names], 0.4, label="peak")
    memory.barh([p - 0.2 for p in positions], [report[n]["idle_rss_mb"] for n in names], 0.4, label="idle")
    memory.set_yticks(list(positions), names)
    memory.set_xlabel("RSS, MB")
    memory.legend()
    speed.barh(list(positions), [report[n]["rps"] for n in names])
    speed.set_yticks(list(positions), [""] * len(names))
    speed.set_xlabel("requests/s under load")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--slim-python", type=Path, help="the slim install's python (default: make .venv-slim)")
    parser.add_argument("--openvino-python", type=Path,
                        help="the openvino extra's python (default: make .venv-openvino)")
    parser.add_argument("--baseline-src", type=Path, help="another source tree's src/ to serve for comparison")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "bf16"])
    parser.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE", help="more environment for every server")
    parser.add_argument("--only", nargs="+", help="configurations to run, in this order (names as in the table)")
    parser.add_argument("--starts", type=int, default=5, help="timed starts per configuration (median reported)")
    parser.add_argument("--explain", action="store_true", help="after the load, one POST /explain and the RSS after it")
    parser.add_argument("--out", default="memory_bench")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        repository = export_repository(Path(scratch) / "models", args.precisions)
        configs = configurations(args, repository, Path(scratch))
        names = args.only or list(configs)
        unknown = [name for name in names if name not in configs]
        if unknown:
            raise SystemExit(f"unknown configurations {unknown}; these exist: {list(configs)}")
        report = {name: measure(*configs[name], args.duration, args.concurrency, args.starts, args.explain)
                  for name in names}
    extra = " after one /explain: RSS MB (method) |" if args.explain else ""
    lines = ["| configuration | first start s (RSS MB) | start to ready s (median, range) | idle RSS MB | peak RSS MB | "
             f"rps | p50 ms |{extra}", "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if extra else "")]
    lines += [f"| {n} | {r['first_start_s']} ({r['first_start_rss_mb']}) | {r['start_to_ready_s']} "
              f"({min(r['start_to_ready_all_s'])}–"  # type: ignore[call-overload]
              f"{max(r['start_to_ready_all_s'])}) | {r['idle_rss_mb']} | {r['peak_rss_mb']} | {r['rps']} | "  # type: ignore[call-overload]
              f"{r['p50_ms']} |" + (f" {r['explain_rss_mb']} ({r['explain_method']}) |" if extra else "")
              for n, r in report.items()]
    machine = describe()
    lines.append(f"\n{args.concurrency} clients for {args.duration:g} s each; machine: {one_line(machine)}.")
    text = "\n".join(lines)
    print(text)
    write_results(RESULTS / args.out, {"machine": machine, "command": " ".join(["memory_bench.py", *(argv or sys.argv[1:])]),
                                       "concurrency": args.concurrency, "duration_s": args.duration,
                                       "configurations": report}, text)
    plot(report, RESULTS / f"{args.out}.png")
    return 0 if all(set(r["statuses"]) == {"200"} for r in report.values()) else 1  # type: ignore[arg-type]


if __name__ == "__main__":
    raise SystemExit(main())
