"""ONNX Runtime's memory-pattern setting for the serving shape: a session serving batches of
every size up to the max batch, with ``enable_mem_pattern`` on (ONNX Runtime's default: it plans
one allocation per input shape it has seen and replays it) or off, the rest as the server sets
it (``backends.onnxruntime._options``: its threads, the arena on, sleeping threads, every graph
optimisation).

    python benchmarks/ort_session_bench.py [--rounds 3] [--max-batch 8] [--threads 2]

ResNet-18 (random-init weights: memory and speed do not depend on their values) is exported as
FP32 and as the server's static INT8, once. Each session runs in a fresh process of its own, so
its RSS is its own: RSS once opened, RSS after a batch of every size from 1 to ``--max-batch``
(in a shuffled order, then the heap trimmed as the server trims it), the peak (``VmHWM``), and
the median ms of batch 1, 4 and the max batch. Rounds alternate the settings, and the table
gives each figure's median over the rounds. Writes ``benchmarks/results/ort_session_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS  # noqa: E402
from machine import publish  # noqa: E402

CHILD = """
import json, statistics, sys, time
import numpy as np, onnxruntime
from resnet_serve.backends.onnxruntime import _options
from resnet_serve.memory import release_free_heap

path, mem_pattern, threads, max_batch = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3]), int(sys.argv[4])

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)

options = _options(threads, arena=True, optimise=True)
options.enable_mem_pattern = mem_pattern
session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
assert session.get_session_options().enable_mem_pattern == mem_pattern
pixels = np.random.default_rng(0).integers(0, 256, (max_batch, 3, 224, 224), dtype=np.uint8)
opened = status_mb("VmRSS")
for size in np.random.default_rng(1).permutation(np.arange(1, max_batch + 1)):
    session.run(None, {"pixels": pixels[:size]})
release_free_heap()
report = {"opened_mb": opened, "after_every_size_mb": status_mb("VmRSS"), "peak_mb": status_mb("VmHWM")}
for size in sorted({1, min(4, max_batch), max_batch}):
    times = []
    for _ in range(15):
        start = time.perf_counter()
        session.run(None, {"pixels": pixels[:size]})
        times.append(time.perf_counter() - start)
    report[f"b{size}_ms"] = round(statistics.median(times) * 1000, 2)
print(json.dumps(report))
"""


def child(python: str, graph: Path, mem_pattern: str, threads: int, max_batch: int) -> dict[str, float]:
    out = subprocess.run([python, "-c", CHILD, str(graph), mem_pattern, str(threads), str(max_batch)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    from resnet_serve.backends.torch.checkpoints import random_init
    from resnet_serve.backends.torch.onnx_export import export_onnx, quantize_onnx
    from resnet_serve.photos import calibration_files, load_pixels
    from resnet_serve.spec import RESNET18

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--python", default=sys.executable, help="the interpreter the sessions run in")
    parser.add_argument("--out", default="ort_session_bench")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_onnx(RESNET18, random_init(RESNET18), Path(scratch) / "fp32.onnx")
        int8 = Path(scratch) / "int8.onnx"
        quantize_onnx(fp32, int8, load_pixels(calibration_files(None), RESNET18))
        for _ in range(args.rounds):
            for graph in (fp32, int8):
                for mem_pattern in ("on", "off"):
                    runs.setdefault(f"{graph.stem} mem_pattern {mem_pattern}", []).append(
                        child(args.python, graph, mem_pattern, args.threads, args.max_batch))
    rows = {name: {key: round(statistics.median(r[key] for r in results), 2) for key in results[0]}
            for name, results in runs.items()}
    keys = list(next(iter(rows.values())))
    lines = ["| session | " + " | ".join(k.replace("_mb", " MB").replace("_ms", " ms").replace("_", " ") for k in keys)
             + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(str(row[k]) for k in keys) + " |" for name, row in rows.items()]
    publish(RESULTS / args.out, lines, f"median of {args.rounds} rounds, each session a fresh process; ONNX Runtime "
            f"{_ort_version(args.python)}, {args.threads} threads, batches 1 to {args.max_batch}",
            {"rows": rows, "runs": runs, "rounds": args.rounds, "max_batch": args.max_batch, "threads": args.threads})
    return 0


def _ort_version(python: str) -> str:
    return subprocess.run([python, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                          check=True, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
