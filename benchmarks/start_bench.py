"""Start to ready: this source tree against others, started alternately on one machine.

    python benchmarks/start_bench.py [--rounds 20] [--tree NAME=SRC ...] [--precision int8]
        [--slim-python .venv-slim/bin/python]

One repository is exported (ResNet-18, random-init weights, ONNX FP32 and INT8). Each tree is a
``src/`` folder served by the slim install's interpreter through ``PYTHONPATH`` (this tree as
``this``, plus every ``--tree``, e.g. ``before=/tmp/old/src`` from ``git worktree add``), all
byte-compiled first as pip would. Every tree is started once to fill its caches, then round by
round, one start of each tree in turn, timed from the process start to the first 200 from
``/health/ready`` (a bare HTTP probe every 10 ms). On a shared 2-core machine a single start
varies by ±0.2 s, so only the alternation and the median say which tree starts faster. Writes
``benchmarks/results/start_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS  # noqa: E402
from machine import publish  # noqa: E402
from memory_bench import compile_sources, export_repository, slim_python, start  # noqa: E402

THIS = Path(__file__).resolve().parent.parent / "src"


def tree(text: str) -> tuple[str, Path]:
    name, _, src = text.partition("=")
    if not src or not (Path(src) / "resnet_serve").is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=SRC, SRC holding resnet_serve/")
    return name, Path(src)


def start_to_ready(command: list[str], env: dict[str, str]) -> float:
    process, _, seconds = start(command, env)
    process.terminate()
    process.wait(60)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tree", type=tree, action="append", default=[], metavar="NAME=SRC")
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--slim-python", type=Path, help="the slim install's python (default: make .venv-slim)")
    parser.add_argument("--out", default="start_bench")
    args = parser.parse_args(argv)
    trees = {"this": THIS, **dict(args.tree)}
    compile_sources(*trees.values())
    command = [str(args.slim_python or slim_python()), "-m", "resnet_serve", "serve"]
    with tempfile.TemporaryDirectory() as scratch:
        repository = export_repository(Path(scratch) / "models", [args.precision])
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
        env.update(RESNET_SERVE_MODEL_REPOSITORY=str(repository), RESNET_SERVE_COMPILED_CACHE_DIR=f"{scratch}/cache",
                   RESNET_SERVE_RUNTIME="onnxruntime", RESNET_SERVE_PRECISION=args.precision, RESNET_SERVE_DEVICE="cpu")
        envs = {name: {**env, "PYTHONPATH": str(src)} for name, src in trees.items()}
        for name in trees:
            start_to_ready(command, envs[name])  # fills the caches: the optimised graph
        times: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name in trees:
                times[name].append(round(start_to_ready(command, envs[name]), 3))
    rows = {name: {"src": str(trees[name]), "median_s": round(statistics.median(t), 3), "min_s": min(t),
                   "max_s": max(t), "starts_s": t} for name, t in times.items()}
    lines = ["| tree | start to ready s, median | fastest | slowest |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['median_s']} | {r['min_s']} | {r['max_s']} |" for name, r in rows.items()]
    publish(RESULTS / args.out, lines, f"slim install, ONNX Runtime {args.precision}, {args.rounds} alternating starts "
            "per tree", {"command": " ".join(["start_bench.py", *(argv or sys.argv[1:])]), "trees": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
