"""Explanations against their targets, in one run on one machine.

    python benchmarks/explain_bench.py [--duration 20] [--concurrency 8] [--explanations 20]

Starts one server (the full install, TorchScript FP32 ResNet-18; RESNET_SERVE_* settings apply),
then measures:

- explanation latency: ``--explanations`` sequential ``POST /explain`` of a 451x300 JPEG after
  one warm-up (which loads the eager network): p50/p90 of the round trip, and of Grad-CAM alone
- ``/predict`` at ``--concurrency`` for ``--duration`` seconds, alone; then the same while one
  client keeps asking for explanations back to back, which is what the target is about:
  /predict p50 alongside explanations within 20% of /predict alone.

Writes ``benchmarks/results/explain_bench.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS, percentile, run_load, spawned_server, unique  # noqa: E402
from images import default_images  # noqa: E402
from machine import publish  # noqa: E402

TARGET = 1.2


def explanation_latency(url: str, photo: bytes, count: int) -> dict[str, float]:
    round_trips, grad_cam = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/explain", files={"file": ("c.jpg", photo)}).raise_for_status()  # loads the eager copy
        for _ in range(count):
            started = time.perf_counter()
            answer = client.post("/explain", files={"file": ("c.jpg", unique(photo))})
            answer.raise_for_status()
            round_trips.append((time.perf_counter() - started) * 1000)
            grad_cam.append(answer.json()["explain_time_ms"])
    return {"p50_ms": round(percentile(round_trips, 50), 1), "p90_ms": round(percentile(round_trips, 90), 1),
            "grad_cam_p50_ms": round(percentile(grad_cam, 50), 1), "count": count}


async def explaining(url: str, photo: bytes, stop: asyncio.Event) -> dict[str, int]:
    """One client asking for explanations back to back until ``stop``."""
    done: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not stop.is_set():
            answer = await client.post("/explain", files={"file": ("c.jpg", unique(photo))})
            done[str(answer.status_code)] = done.get(str(answer.status_code), 0) + 1
    return done


async def predict_alongside(url: str, images: list[bytes], photo: bytes, concurrency: int,
                            duration: float) -> tuple[dict[str, object], dict[str, int]]:
    stop = asyncio.Event()
    explainer = asyncio.create_task(explaining(url, photo, stop))
    await asyncio.sleep(1.0)  # the explanations are running before the predictions start
    load = await run_load(url, images, concurrency, duration)
    stop.set()
    return dataclasses.asdict(load), await explainer


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alone, along = report["predict_alone"], report["predict_alongside"]  # type: ignore[index]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = ["/predict alone", "/predict + explanations"]
    ax.bar(names, [alone["p50_ms"], along["p50_ms"]], color=["#0b5cad", "#d9822b"])  # type: ignore[index]
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"/predict at c={alone['concurrency']}; explanation p50 "  # type: ignore[index]
                 f"{report['explanation']['p50_ms']} ms")  # type: ignore[index]
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--explanations", type=int, default=20)
    parser.add_argument("--out", default="explain_bench")
    args = parser.parse_args(argv)
    images = default_images()
    photo = images[0]  # scikit-image's cat, 451x300, as a JPEG: the example upload
    env = {"RESNET_SERVE_RUNTIME": "torchscript", "RESNET_SERVE_CACHE_SIZE": "0"}
    with spawned_server(env) as (url, _):
        asyncio.run(run_load(url, images, args.concurrency, 3.0))  # warm
        explanation = explanation_latency(url, photo, args.explanations)
        alone = dataclasses.asdict(asyncio.run(run_load(url, images, args.concurrency, args.duration)))
        along, explained = asyncio.run(predict_alongside(url, images, photo, args.concurrency, args.duration))
    ratio = round(along["p50_ms"] / alone["p50_ms"], 3)  # type: ignore[operator]
    report: dict[str, object] = {"explanation": explanation, "predict_alone": alone, "predict_alongside": along,
                                 "explanations_alongside": explained, "p50_ratio": ratio, "target_ratio": TARGET}
    lines = ["| measurement | p50 ms | p90 ms | rps / count |", "|---|---|---|---|",
             f"| POST /explain (451x300 JPEG, sequential) | {explanation['p50_ms']} | {explanation['p90_ms']} "
             f"| {explanation['count']} (Grad-CAM alone p50 {explanation['grad_cam_p50_ms']} ms) |",
             f"| /predict c={args.concurrency} alone | {alone['p50_ms']} | {alone['p90_ms']} | {alone['throughput_rps']} rps |",
             f"| /predict c={args.concurrency} + explanations | {along['p50_ms']} | {along['p90_ms']} | "
             f"{along['throughput_rps']} rps; explanations {explained} |",
             "", f"/predict p50 alongside explanations / alone: **{ratio}** (target ≤ {TARGET})"]
    plot(report, RESULTS / f"{args.out}.png")
    publish(RESULTS / args.out, lines, f"`python benchmarks/explain_bench.py --duration {args.duration:g} "
            f"--concurrency {args.concurrency}`, TorchScript FP32, random-init ResNet-18", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
