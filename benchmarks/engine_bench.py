"""Engine benchmark: each precision/runtime at batch sizes 1-32, in a fresh process each.

For every configuration: p50 latency and images/s per batch size, peak RSS, model file size,
cold start (compile, INT8 calibration included) and warm start (load from the compiled-model
cache), plus the INT8 models' agreement with FP32 (Top-1 agreement, Top-5 overlap) on real
photos. Writes ``benchmarks/results/engine_bench.{json,md,png}``.

    python benchmarks/engine_bench.py                      # CPU configurations
    python benchmarks/engine_bench.py --configs fp16-cuda --batch-sizes 1 8 32 64 128 256

Weights follow the usual resolution (official file if present); speed does not depend on them,
agreement figures do, and are labelled with the weights used.

Each configuration names its runtime (TorchScript, ONNX Runtime or OpenVINO; ``openvino-bf16``
runs the FP32 ONNX graph in BF16), except ``auto-*``, where the service times the installed
runtimes as ``RESNET_SERVE_RUNTIME=auto`` does and the table says what it chose and why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, one_line  # noqa: E402

RESULTS = Path(__file__).parent / "results"

TS = {"RESNET_SERVE_RUNTIME": "torchscript", "RESNET_SERVE_DEVICE": "cpu"}  # never left to RUNTIME=auto
ORT = {"RESNET_SERVE_RUNTIME": "onnxruntime", "RESNET_SERVE_DEVICE": "cpu"}
OPENVINO = {"RESNET_SERVE_RUNTIME": "openvino", "RESNET_SERVE_DEVICE": "cpu"}  # the openvino extra
AUTO = {"RESNET_SERVE_RUNTIME": "auto", "RESNET_SERVE_DEVICE": "cpu"}  # the service times both and chooses
CONFIGS: dict[str, dict[str, str]] = {
    "fp32": {**TS, "RESNET_SERVE_PRECISION": "fp32", "RESNET_SERVE_CHANNELS_LAST": "false"},
    "fp32-cl": {**TS, "RESNET_SERVE_PRECISION": "fp32"},
    "int8-x86": {**TS, "RESNET_SERVE_PRECISION": "int8", "RESNET_SERVE_INT8_BACKEND": "x86"},
    "int8-fbgemm": {**TS, "RESNET_SERVE_PRECISION": "int8", "RESNET_SERVE_INT8_BACKEND": "fbgemm"},
    "int8-onednn": {**TS, "RESNET_SERVE_PRECISION": "int8", "RESNET_SERVE_INT8_BACKEND": "onednn"},
    "bf16-cl": {**TS, "RESNET_SERVE_PRECISION": "bf16"},
    "onnxruntime": {**ORT, "RESNET_SERVE_PRECISION": "fp32"},
    "onnxruntime-int8": {**ORT, "RESNET_SERVE_PRECISION": "int8"},
    "openvino": {**OPENVINO, "RESNET_SERVE_PRECISION": "fp32"},
    "openvino-int8": {**OPENVINO, "RESNET_SERVE_PRECISION": "int8"},
    "openvino-bf16": {**OPENVINO, "RESNET_SERVE_PRECISION": "bf16"},
    "auto-fp32": {**AUTO, "RESNET_SERVE_PRECISION": "fp32"},
    "auto-int8": {**AUTO, "RESNET_SERVE_PRECISION": "int8"},
    "auto-bf16": {**AUTO, "RESNET_SERVE_PRECISION": "bf16"},
    "fp16-cuda": {"RESNET_SERVE_PRECISION": "fp16", "RESNET_SERVE_DEVICE": "cuda"},
    "fp32-cuda": {"RESNET_SERVE_PRECISION": "fp32", "RESNET_SERVE_DEVICE": "cuda"},
}
CPU_CONFIGS = ["fp32", "fp32-cl", "bf16-cl", "int8-x86", "int8-fbgemm", "int8-onednn", "onnxruntime", "onnxruntime-int8",
               "openvino", "openvino-int8", "openvino-bf16"]


def photo_batch() -> object:
    """Real photos (scikit-image's) pre-processed like the service does."""
    import numpy as np
    import skimage

    from resnet_serve.spec import RESNET18
    from resnet_serve.transform import preprocess

    data = Path(skimage.__file__).parent / "data"
    names = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
             "motorcycle_right.png", "horse.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png"]
    return np.stack([preprocess((data / n).read_bytes(), RESNET18, max_pixels=10**9).pixels for n in names])


def run_one(batch_sizes: list[int], repeats: int) -> dict[str, object]:
    """Measure the configuration in this process's environment (called in a child process)."""
    import numpy as np

    from resnet_serve.loading import open_model
    from resnet_serve.results import top_k
    from resnet_serve.settings import Settings

    cache_dir = Path(os.environ["RESNET_SERVE_COMPILED_CACHE_DIR"])
    settings = Settings(max_batch_size=1)
    cold = open_model(settings)  # exports the default model into the repository under the cache
    cold.close()
    warm = open_model(settings)  # loads it from there
    artefacts = [p for p in cache_dir.rglob("model.*") if p.suffix in (".pt", ".onnx")]
    photos = photo_batch()

    async def measure() -> list[dict[str, float]]:
        """On one event loop, as in the server: each call goes through the inference thread."""
        results = []
        for n in batch_sizes:
            batch = list(np.resize(photos, (n, *photos.shape[1:])))  # type: ignore[attr-defined]
            start = time.perf_counter()  # the first call at this size: what a request pays for a new shape
            await warm.predict(batch)
            first = time.perf_counter() - start
            for _ in range(2):
                await warm.predict(batch)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                await warm.predict(batch)
                times.append(time.perf_counter() - start)
            p50 = statistics.median(times)
            results.append({"batch_size": n, "p50_ms": round(p50 * 1000, 2), "images_per_s": round(n / p50, 1),
                            "first_ms": round(first * 1000, 2)})
        return results

    results = asyncio.run(measure())
    top5 = [top_k(p.probs, 5)[1] for p in asyncio.run(warm.predict(list(photos)))]  # type: ignore[call-overload]
    info = warm.info
    warm.close()
    return {
        "device": info.device, "precision": info.precision, "channels_last": info.channels_last,
        "weights": info.weights.source, "runtime": info.runtime, "runtime_reason": info.runtime_reason,
        "threads": info.threads,
        "cold_start_s": cold.info.start_s, "warm_start_s": info.start_s, "warm_from": info.compiled_from,
        "model_file_mb": round(sum(p.stat().st_size for p in artefacts) / 1e6, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": results, "top5": top5,
    }


def agreement(candidate: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    top1 = sum(c[0] == r[0] for c, r in zip(candidate, reference)) / len(reference)
    top5 = sum(len(set(c) & set(r)) for c, r in zip(candidate, reference)) / (5 * len(reference))
    return {"top1_agreement": round(top1, 3), "top5_overlap": round(top5, 3)}


def markdown(report: dict[str, dict[str, object]], batch_sizes: list[int]) -> str:
    head = "| config | " + " | ".join(f"b={n} ms (img/s)" for n in batch_sizes)
    head += " | cold start s | warm start s | file MB | peak RSS MB | vs FP32 (top-1 / top-5) |"
    lines = [head, "|---" * (len(batch_sizes) + 6) + "|"]
    for name, r in report.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |")
            continue
        cells = [f"{x['p50_ms']} ({x['images_per_s']})" for x in r["results"]]  # type: ignore[union-attr]
        agree = r.get("agreement")
        agree_text = f"{agree['top1_agreement']:.0%} / {agree['top5_overlap']:.0%}" if agree else "-"  # type: ignore[index]
        label = f"{name} → {r['runtime']} ({r['runtime_reason']})" if name.startswith("auto-") else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['cold_start_s']} | {r['warm_start_s']} | "
                     f"{r['model_file_mb']} | {r['peak_rss_mb']} | {agree_text} |")
    lines += ["", "First call at each batch size, ms (the engine warmed batch 1 only; the p50 above for comparison):", "",
              "| config | " + " | ".join(f"b={n}" for n in batch_sizes) + " |", "|---" * (len(batch_sizes) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{x['first_ms']} ({x['p50_ms']})" for x in r["results"]) + " |"  # type: ignore[union-attr]
              for name, r in report.items() if "results" in r]
    return "\n".join(lines)


def plot(report: dict[str, dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in report.items():
        if "results" in r:
            xs = [x["batch_size"] for x in r["results"]]  # type: ignore[union-attr]
            ys = [x["images_per_s"] for x in r["results"]]  # type: ignore[union-attr]
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"ResNet-18 engine throughput ({one_line(describe())})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=CPU_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="engine_bench")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(args.batch_sizes, args.repeats)))
        return 0
    report: dict[str, dict[str, object]] = {}
    for name in args.configs:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, **CONFIGS[name], "RESNET_SERVE_COMPILED_CACHE_DIR": cache,
                   "RESNET_SERVE_ALLOW_DOWNLOAD": os.environ.get("RESNET_SERVE_ALLOW_DOWNLOAD", "false")}
            child = subprocess.run(
                [sys.executable, __file__, "--one", "--batch-sizes", *map(str, args.batch_sizes),
                 "--repeats", str(args.repeats)],
                env=env, capture_output=True, text=True,
            )
        if child.returncode != 0:
            report[name] = {"error": child.stderr.strip().splitlines()[-1] if child.stderr else "failed"}
        else:
            report[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name}: {'ok' if 'results' in report[name] else report[name]['error']}", file=sys.stderr)
    reference = next((r["top5"] for n, r in report.items() if n.startswith("fp32") and "top5" in r), None)
    for name, r in report.items():
        if reference is not None and "top5" in r and not name.startswith("fp32"):
            r["agreement"] = agreement(r["top5"], reference)  # type: ignore[arg-type]
    machine = describe()
    table = markdown(report, args.batch_sizes) + f"\n\nMachine: {one_line(machine)}."
    print(table)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": machine,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    (RESULTS / f"{args.out}.json").write_text(json.dumps({**meta, "configs": report}, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(table + "\n")
    plot(report, RESULTS / f"{args.out}.png")
    return 0 if all("results" in r for r in report.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
