"""Burst test: N concurrent uploads at once against a small queue; only 200s and 503s allowed.

    python benchmarks/burst.py --requests 500 --max-queue 16

Starts a server (result cache off, so every request takes the real path), sends one burst to
warm allocators and pools, then the measured burst, and reports the status counts, the time it
took, and the server's RSS before and after. Writes ``benchmarks/results/burst.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS, spawned_server  # noqa: E402
from images import default_images  # noqa: E402
from machine import save_metrics  # noqa: E402
from soak import rss_mb  # noqa: E402


async def burst(url: str, image: bytes, count: int) -> Counter[str]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one() -> str:
            try:
                response = await client.post("/predict", files={"file": ("a.jpg", image, "image/jpeg")})
                return str(response.status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__
        return Counter(await asyncio.gather(*(one() for _ in range(count))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--out", default="burst")
    args = parser.parse_args(argv)

    image = default_images()[2]
    env = {"RESNET_SERVE_MAX_QUEUE": str(args.max_queue), "RESNET_SERVE_CACHE_SIZE": "0"}
    with spawned_server(env) as (url, process):
        asyncio.run(burst(url, image, args.requests))
        before = rss_mb(process.pid)
        start = time.perf_counter()
        counts = asyncio.run(burst(url, image, args.requests))
        seconds = time.perf_counter() - start
        after = rss_mb(process.pid)
    report = {"requests": args.requests, "max_queue": args.max_queue, "statuses": dict(sorted(counts.items())),
              "seconds": round(seconds, 2), "rss_mb_before": before, "rss_mb_after": after}
    save_metrics(report, RESULTS / args.out)
    return 0 if set(counts) <= {"200", "503"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
