"""Bulk classification against its targets, in one run on one machine.

    python benchmarks/bulk_bench.py [--images 2000] [--small 200] [--runtime auto] [--precision fp32]

Makes ``--images`` JPEGs from scikit-image's photos (random crops, sizes and flips), then measures:

- in-process: decode, pre-process and inference in full batches on one event loop, with no
  server (``http_bench.in_process_ms``): what the offline run is held to
- offline: ``resnet-serve predict DIR --output out.csv`` in a child process, on ``--small`` of the
  images and on all of them: images/s, and the process's peak RSS each time (the growth from the
  small run to the large one shows whether memory depends on the number of inputs)
- server: the same command with ``--server`` against a local server, at concurrency 8

Writes ``benchmarks/results/bulk_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS, in_process_ms, spawned_server  # noqa: E402
from images import default_images  # noqa: E402
from machine import publish  # noqa: E402

CHILD = """
import json, resource, sys, time
from resnet_serve.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print("RESULT " + json.dumps({"code": code, "total_s": time.perf_counter() - started,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
RATE = re.compile(r"in ([0-9.]+) s \(([0-9.]+) images/s\)")


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    from PIL import Image, ImageOps

    rng = random.Random(seed)
    photos = [Image.open(io.BytesIO(data)).convert("RGB") for data in default_images()]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = photo.crop((left, top, left + cw, top + ch))
        scale = rng.uniform(200, 900) / max(cw, ch)
        image = image.resize((max(8, int(cw * scale)), max(8, int(ch * scale))))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        path = folder / f"{i // 100:03d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=rng.randint(80, 95))
        paths.append(path)
    return paths


def run_cli(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """The run's summary (classifying only: the model is loaded before it) and its whole time."""
    done = subprocess.run([sys.executable, "-c", CHILD, "predict", *args], env=env, capture_output=True,
                          text=True, timeout=3600)
    result = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    rate = RATE.search(done.stderr.splitlines()[-1] if done.stderr.strip() else "")
    if result is None or rate is None:
        raise SystemExit(f"predict failed: {done.stderr[-2000:]}")
    run = json.loads(result.removeprefix("RESULT "))
    run["seconds"], run["images_per_s"] = float(rate.group(1)), float(rate.group(2))
    return run  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--runtime", default="auto", choices=["auto", "torchscript", "onnxruntime"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="bulk_bench")
    args = parser.parse_args(argv)
    overrides = {"RESNET_SERVE_RUNTIME": args.runtime, "RESNET_SERVE_PRECISION": args.precision,
                 "RESNET_SERVE_ALLOW_DOWNLOAD": "false"}
    env = {**os.environ, **overrides}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        paths = make_images(root / "all", args.images)
        small = root / "small"
        small.mkdir()
        for path in paths[: args.small]:
            (small / path.name).symlink_to(path)
        images = [p.read_bytes() for p in paths[:50]]
        baseline = in_process_ms(images, 100, overrides)["batched_images_per_s"]
        runs = {"offline, small": run_cli([str(small), "--output", str(root / "small.csv")], env),
                "offline": run_cli([str(root / "all"), "--output", str(root / "all.csv")], env)}
        with spawned_server({**overrides, "RESNET_SERVE_CACHE_SIZE": "0"}) as (url, _):
            runs["server"] = run_cli([str(root / "all"), "--output", str(root / "server.csv"), "--server", url,
                                      "--concurrency", str(args.concurrency)], env)
    counts = {"offline, small": args.small, "offline": args.images, "server": args.images}
    offline, server = runs["offline"]["images_per_s"], runs["server"]["images_per_s"]
    ratios = {"offline_vs_in_process": round(offline / baseline, 2), "server_vs_offline": round(server / offline, 2),
              "rss_growth_mb": round(runs["offline"]["peak_rss_mb"] - runs["offline, small"]["peak_rss_mb"], 1)}
    lines = ["| run | images | images/s (classifying) | whole run s | peak RSS MB |", "|---|---:|---:|---:|---:|",
             f"| in-process pipeline (no server, batches of the configured size) | 100 | {baseline} | - | - |"]
    lines += [f"| {name} | {counts[name]} | {run['images_per_s']} | {round(run['total_s'], 1)} | "
              f"{round(run['peak_rss_mb'], 1) if name != 'server' else '(client)'} |" for name, run in runs.items()]
    publish(RESULTS / args.out, lines, f"Ratios: {ratios}. Runtime {args.runtime}, {args.precision}; server at "
            f"concurrency {args.concurrency}", {"command": " ".join(["bulk_bench.py", *(argv or sys.argv[1:])]),
                                                "runs": runs, "in_process_images_per_s": baseline, "ratios": ratios})
    return 0 if all(run["code"] == 0 for run in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
