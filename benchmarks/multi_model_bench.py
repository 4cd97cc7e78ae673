"""Two models served at once: each one's throughput and latency under mixed load, next to the
same model served alone, in one run on one machine.

    python benchmarks/multi_model_bench.py [--repository DIR --models a b] [--concurrency 8] [--duration 15]

Without ``--repository`` it exports two random-init models first (ResNet-18 and
MobileNetV3-Small, TorchScript FP32; their speed does not depend on the weights). Each model is
served alone (a repository holding only it), then both together with the load split evenly
between them (``--concurrency`` clients in all, closed loop, unique uploads so the result cache
never answers). Writes ``benchmarks/results/multi_model_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS, spawned_server  # noqa: E402
from http_bench import run_load as measure  # noqa: E402
from images import default_images  # noqa: E402
from machine import describe, one_line, write_results  # noqa: E402


def export_two(folder: Path) -> tuple[Path, list[str]]:
    from resnet_serve.cli import main

    for arch, name in (("resnet18", "resnet18"), ("mobilenet_v3_small", "mobilenet")):
        code = main(["export", "--arch", arch, "--weights", "random", "--name", name, "--repository",
                     str(folder), "--format", "torchscript"])
        if code:
            raise SystemExit(f"exporting {arch} failed")
    return folder, ["resnet18", "mobilenet"]


def only(repository: Path, model: str, scratch: Path) -> Path:
    """A repository holding just ``model`` (a link to its folder)."""
    folder = scratch / f"only-{model}"
    folder.mkdir()
    (folder / model).symlink_to((repository / model).resolve(), target_is_directory=True)
    return folder


def serve_and_load(repository: Path, load: dict[str, int], duration: float, warmup: float) -> dict[str, dict]:
    """Serve ``repository``; run every model's share of the load at the same time."""
    images = default_images()
    env = {"RESNET_SERVE_MODEL_REPOSITORY": str(repository), "RESNET_SERVE_CACHE_SIZE": "0"}
    with spawned_server(env) as (url, _):
        async def together(seconds: float) -> list[object]:
            return await asyncio.gather(*(measure(url, images, c, seconds, model=m) for m, c in load.items()))

        asyncio.run(together(warmup))
        results = asyncio.run(together(duration))
    return {m: {"rps": r.throughput_rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "statuses": r.statuses,
                "mean_batch_size": r.mean_batch_size} for m, r in zip(load, results)}  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="a repository with the two models (default: export two)")
    parser.add_argument("--models", nargs=2, help="the two models of --repository")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in all (split evenly when mixed)")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--out", default="multi_model_bench")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        repository, models = (args.repository, args.models) if args.repository else export_two(Path(scratch) / "r")
        half = max(1, args.concurrency // 2)
        alone = {m: serve_and_load(only(repository, m, Path(scratch)), {m: half}, args.duration, args.warmup)[m]
                 for m in models}
        mixed = serve_and_load(repository, {m: half for m in models}, args.duration, args.warmup)
    lines = ["| model | alone: rps | alone: p50 ms | both served, mixed load: rps | mixed: p50 ms | rps mixed/alone |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in models:
        ratio = round(mixed[m]["rps"] / alone[m]["rps"], 2) if alone[m]["rps"] else 0.0
        lines.append(f"| {m} | {alone[m]['rps']} | {alone[m]['p50_ms']} | {mixed[m]['rps']} | "
                     f"{mixed[m]['p50_ms']} | {ratio} |")
    machine = describe()
    lines.append(f"\n{half} clients per model in every run; machine: {one_line(machine)}.")
    text = "\n".join(lines)
    print(text)
    report = {"machine": machine, "command": " ".join(["multi_model_bench.py", *(argv or sys.argv[1:])]),
              "clients_per_model": half, "duration_s": args.duration, "alone": alone, "mixed": mixed}
    write_results(RESULTS / args.out, report, text)
    ok = all(set(r["statuses"]) == {"200"} for r in [*alone.values(), *mixed.values()])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
