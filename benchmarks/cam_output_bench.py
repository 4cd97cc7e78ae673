"""What the ONNX graph's second output (``features``, for CAM without torch) costs serving.

    python benchmarks/cam_output_bench.py [--rounds 8] [--repeats 40] [--threads 2]

Exports a random-init ResNet-18 to ONNX twice, with and without the ``features`` output, in FP32
and static INT8 (the export's own recipe), then times ``OnnxRuntimeBackend.run`` (which asks for
``probs`` only, as serving does) at batch 1 and 4, the two graphs interleaved round by round;
the median of the per-round medians. Writes ``benchmarks/results/cam_output_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS  # noqa: E402
from machine import publish  # noqa: E402


def graphs(folder: Path) -> dict[str, Path]:
    """The four graphs: FP32 and INT8, each with and without ``features``."""
    from resnet_serve.backends.torch.checkpoints import random_init
    from resnet_serve.backends.torch.onnx_export import export_onnx, quantize_onnx
    from resnet_serve.photos import calibration_files, load_pixels
    from resnet_serve.spec import RESNET18

    weights, calibration = random_init(RESNET18), load_pixels(calibration_files(None), RESNET18)
    paths = {}
    for label, features in (("without", None), ("with", "layer4")):
        fp32 = export_onnx(RESNET18, weights, folder / f"{label}.fp32.onnx", features)
        quantize_onnx(fp32, folder / f"{label}.int8.onnx", calibration)
        paths[f"fp32 {label} features"] = fp32
        paths[f"int8 {label} features"] = folder / f"{label}.int8.onnx"
    return paths


def median_ms(backend: object, batch: np.ndarray, repeats: int) -> float:
    for _ in range(3):
        backend.run(batch)  # type: ignore[attr-defined]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        backend.run(batch)  # type: ignore[attr-defined]
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="cam_output_bench")
    args = parser.parse_args(argv)
    from resnet_serve.backends.onnxruntime import OnnxRuntimeBackend

    with tempfile.TemporaryDirectory() as scratch:
        backends = {name: OnnxRuntimeBackend(path, threads=args.threads) for name, path in graphs(Path(scratch)).items()}
        rows: dict[str, dict[str, float]] = {name: {} for name in backends}
        for size in (1, 4):
            batch = np.random.default_rng(0).integers(0, 256, (size, 3, 224, 224), dtype=np.uint8)
            rounds: dict[str, list[float]] = {name: [] for name in backends}
            for _ in range(args.rounds):
                for name, backend in backends.items():
                    rounds[name].append(median_ms(backend, batch, args.repeats))
            for name in backends:
                rows[name][f"b{size}_ms"] = round(statistics.median(rounds[name]), 2)
    lines = ["| graph | batch 1 ms | batch 4 ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['b1_ms']} | {row['b4_ms']} |" for name, row in rows.items()]
    publish(RESULTS / args.out, lines, f"`python benchmarks/cam_output_bench.py --rounds {args.rounds} --repeats "
            f"{args.repeats} --threads {args.threads}`, median of per-round medians, interleaved",
            {"rows": rows, "rounds": args.rounds, "repeats": args.repeats, "threads": args.threads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
