"""Start to ready, and where it goes: this source tree against others, started alternately.

    python benchmarks/start_bench.py [--rounds 20] [--tree NAME=SRC ...] [--httpx-probe]
        [--precision int8] [--slim-python .venv-slim/bin/python]

One repository is exported (ResNet-18, random-init weights, ONNX FP32 and INT8). Three tables:

- **Start to ready.** Each tree is a ``src/`` folder served by the slim install's interpreter
  through ``PYTHONPATH`` (this tree as ``this``, plus every ``--tree``, e.g.
  ``before=/tmp/old/src`` from ``git worktree add``), all byte-compiled first as pip would. Each
  is started once to fill its caches, then round by round, one start of each in turn, timed
  from the process start to the first 200 from ``/health/ready`` (a bare HTTP probe every
  10 ms). ``--httpx-probe`` adds this tree polled as the benchmarks used to: ``httpx.get`` every
  20 ms. On a shared 2-core machine one start varies by ±0.2 s, so only the alternation and the
  median say which is faster.
- **Imports**, in fresh slim interpreters, alternately: the third-party libraries the server
  imports, alone; everything ``resnet-serve serve`` imports before it serves, with the GC on and
  paused as the entry module pauses it; an ``importlib.metadata`` version lookup.
- **Load** of the ONNX Runtime backend (this environment, ``--threads``): the artefact's SHA-256
  check; the optimised graph a restart finds kept, opened as the server keeps it (weights in a
  file of their own, mapped) and as it was kept before (one file); then fresh sessions each
  round warmed with every batch size 1..4, the largest only, or batch 1 only (what the server
  does), and the first calls after batch 1 alone, or after no warm-up at all, less their steady
  time.
- **Workers' memory**: each tree started ``PSS_STARTS`` times more with ``WORKERS`` uvicorn workers,
  the proportional set size of the whole process tree ``SETTLE_S`` after it is ready, so what the
  workers share (libraries, a kept graph's mapped weights) counts once.

Writes ``benchmarks/results/start_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS  # noqa: E402
from machine import publish  # noqa: E402
from memory_bench import compile_sources, export_repository, httpx_probe, start  # noqa: E402
from venvs import torch_free_python  # noqa: E402

THIS = Path(__file__).resolve().parent.parent / "src"
THIRD_PARTY = ("fastapi, fastapi.middleware.cors, numpy, onnxruntime, uvicorn, uvicorn.server, "
               "uvicorn.protocols.http.httptools_impl, uvloop, PIL.Image, PIL.ImageOps, pydantic_settings, "
               "prometheus_client, multipart, argparse")
SERVED = "resnet_serve.cli, resnet_serve.http.app, resnet_serve.backends.onnxruntime, uvicorn.server, uvloop"
IMPORTS = {  # name: (untimed set-up, timed statement)
    "third-party libraries alone": ("", f"import {THIRD_PARTY}"),
    "all the server imports, GC on": ("", f"import {SERVED}"),
    "all the server imports, GC paused": ("import gc; gc.disable()", f"import {SERVED}"),
    "importlib.metadata.version('onnxruntime')": ("import onnxruntime", "from importlib import metadata; "
                                                  "metadata.version('onnxruntime')"),
}
MAX_BATCH = 4
WORKERS, SETTLE_S, PSS_STARTS = 2, 4.0, 3


def tree(text: str) -> tuple[str, Path]:
    name, _, src = text.partition("=")
    if not src or not (Path(src) / "resnet_serve").is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=SRC, SRC holding resnet_serve/")
    return name, Path(src)


def start_to_ready(command: list[str], env: dict[str, str], old_probe: bool = False) -> float:
    process, _, seconds = (start(command, env, httpx_probe, 0.02) if old_probe else start(command, env))
    process.terminate()
    process.wait(60)
    return seconds


def tree_pss_mb(root: int) -> float:
    """The proportional set size of a process and all its descendants: what the machine pays
    for them, each page they share (a library, a mapped file) counted once among them."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    family, total = {root}, 0.0
    while grown := {pid for pid, parent in parents.items() if parent in family} - family:
        family |= grown
    for pid in family:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
    return total


def workers_pss_mb(command: list[str], env: dict[str, str]) -> float:
    """A server of ``WORKERS`` uvicorn workers, measured ``SETTLE_S`` after its first readiness
    answer (one worker's; a worker starts in about a second here)."""
    process, _, _ = start(command, {**env, "RESNET_SERVE_WORKERS": str(WORKERS)})
    try:
        time.sleep(SETTLE_S)
        return tree_pss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(60)


def import_seconds(python: str, setup: str, statement: str) -> float:
    """One fresh interpreter's time for ``statement`` after ``setup`` (this tree on its path)."""
    code = f"{setup}\nimport time\nt = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t)"
    out = subprocess.run([python, "-c", code], env={**os.environ, "PYTHONPATH": str(THIS)}, capture_output=True,
                         text=True, check=True).stdout
    return float(out)


def open_kept_ms(graph: Path, threads: int, scratch: Path) -> dict[str, float]:
    """Opening the optimised graph a restart finds kept: as the server keeps it (a folder, the
    weights in their own file, mapped), and as it kept it before (one file, weights inside)."""
    import onnxruntime

    from resnet_serve.backends.onnxruntime import OnnxRuntimeBackend

    def options(optimise: bool) -> onnxruntime.SessionOptions:
        chosen = onnxruntime.SessionOptions()
        chosen.intra_op_num_threads, chosen.inter_op_num_threads = threads, 1
        chosen.graph_optimization_level = (onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                           else onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)
        chosen.log_severity_level = 3
        return chosen

    folder, single = scratch / "kept", scratch / "kept-in-one-file.onnx"
    if not single.exists():
        OnnxRuntimeBackend(graph, threads=threads, optimised=folder)
        making = options(True)
        making.optimized_model_filepath = str(single)
        onnxruntime.InferenceSession(str(graph), making, providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    OnnxRuntimeBackend(graph, threads=threads, optimised=folder)
    mapped = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    onnxruntime.InferenceSession(str(single), options(False), providers=["CPUExecutionProvider"])
    return {"open the kept graph, weights mapped (the server)": mapped,
            "open the kept graph, weights inside (before)": (time.perf_counter() - started) * 1000}


def load_ms(graph: Path, threads: int, scratch: Path) -> dict[str, float]:
    """The artefact's SHA-256 check, the kept graph opened each way, and fresh sessions warmed
    each way, with the first calls after batch 1 alone (what the server warms) and after none,
    less their steady time."""
    from resnet_serve.backends.onnxruntime import OnnxRuntimeBackend
    from resnet_serve.weights import sha256_of

    def call(backend: OnnxRuntimeBackend, n: int) -> float:
        started = time.perf_counter()
        backend.run(np.zeros((n, 3, 224, 224), dtype=np.uint8))
        return (time.perf_counter() - started) * 1000

    def extra(backend: OnnxRuntimeBackend, n: int) -> float:
        first = call(backend, n)
        return first - min(call(backend, n) for _ in range(3))

    started = time.perf_counter()
    sha256_of(graph)
    result = {"SHA-256 of the artefact": (time.perf_counter() - started) * 1000, **open_kept_ms(graph, threads, scratch)}
    every = OnnxRuntimeBackend(graph, threads=threads)
    result["warm every size 1-4"] = sum(call(every, n) for n in range(1, MAX_BATCH + 1))
    result["warm the largest only"] = call(OnnxRuntimeBackend(graph, threads=threads), MAX_BATCH)
    smallest = OnnxRuntimeBackend(graph, threads=threads)
    result["warm batch 1 only (the server)"] = call(smallest, 1)
    for n in range(2, MAX_BATCH + 1):
        result[f"then batch {n}'s first call, more"] = extra(smallest, n)
    result[f"no warm-up: batch {MAX_BATCH}'s first call, more"] = extra(OnnxRuntimeBackend(graph, threads=threads),
                                                                         MAX_BATCH)
    return result


def medians(samples: list[dict[str, float]]) -> dict[str, dict[str, object]]:
    return {k: {"median": round(statistics.median(s[k] for s in samples), 3),
                "all": [round(s[k], 3) for s in samples]} for k in samples[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tree", type=tree, action="append", default=[], metavar="NAME=SRC")
    parser.add_argument("--httpx-probe", action="store_true", help="also time this tree polled by httpx.get")
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime threads (warm-up)")
    parser.add_argument("--slim-python", type=Path, help="the slim install's python (default: make .venv-slim)")
    parser.add_argument("--out", default="start_bench")
    args = parser.parse_args(argv)
    trees = {"this": THIS, **dict(args.tree)}
    compile_sources(*trees.values())
    python = str(args.slim_python or torch_free_python())
    command = [python, "-m", "resnet_serve", "serve"]
    runs = {name: (name, False) for name in trees}
    if args.httpx_probe:
        runs["this, polled by httpx.get every 20 ms"] = ("this", True)
    with tempfile.TemporaryDirectory() as scratch:
        repository = export_repository(Path(scratch) / "models", [args.precision])
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
        env.update(RESNET_SERVE_MODEL_REPOSITORY=str(repository), RESNET_SERVE_COMPILED_CACHE_DIR=f"{scratch}/cache",
                   RESNET_SERVE_RUNTIME="onnxruntime", RESNET_SERVE_PRECISION=args.precision, RESNET_SERVE_DEVICE="cpu")
        envs = {name: {**env, "PYTHONPATH": str(src)} for name, src in trees.items()}
        for name in trees:
            start_to_ready(command, envs[name])  # fills the caches: the optimised graph
        starts: list[dict[str, float]] = []
        imports: list[dict[str, float]] = []
        loads: list[dict[str, float]] = []
        graph = repository / "resnet18" / "1" / f"model.{args.precision}.onnx"
        for _ in range(args.rounds):
            starts.append({run: start_to_ready(command, envs[tree_name], old) for run, (tree_name, old) in runs.items()})
            imports.append({name: import_seconds(python, *code) for name, code in IMPORTS.items()})
            loads.append(load_ms(graph, args.threads, Path(scratch)))
        pss = [{name: workers_pss_mb(command, envs[name]) for name in trees} for _ in range(PSS_STARTS)]
    report = {"starts_s": medians(starts), "imports_s": medians(imports), "load_ms": medians(loads),
              "workers_pss_mb": medians(pss), "trees": {name: str(src) for name, src in trees.items()}}
    lines = ["| start to ready | median s | fastest | slowest |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['median']} | {min(row['all'])} | {max(row['all'])} |"  # type: ignore[type-var]
              for name, row in report["starts_s"].items()]  # type: ignore[attr-defined]
    for title, key in (("imports, fresh interpreter", "imports_s"), ("ONNX Runtime load, batch up to 4, ms", "load_ms"),
                       (f"{WORKERS} workers, PSS of the whole server, MB ({PSS_STARTS} starts)", "workers_pss_mb")):
        lines += ["", f"| {title} | median |", "|---|---:|"]
        lines += [f"| {name} | {row['median']} |" for name, row in report[key].items()]  # type: ignore[attr-defined]
    publish(RESULTS / args.out, lines, f"slim install, ONNX Runtime {args.precision}, {args.rounds} alternating rounds",
            {"command": " ".join(["start_bench.py", *(argv or sys.argv[1:])]), **report})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
