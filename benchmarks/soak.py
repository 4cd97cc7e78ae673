"""Soak test: mixed good and bad traffic for a while; status counts, latency and memory drift.

    python benchmarks/soak.py --spawn --duration 120 --concurrency 16

Good requests upload real photos; bad ones (a share set by --bad) send the hostile inputs the
service must refuse cleanly: empty, text, truncated JPEG, a decompression-bomb PNG header, and
an 11 MB body. Reports requests, status counts, p50/p99 of good requests, and the server's RSS
at start and end (``--spawn``, or ``--pid`` for a local server). Writes
``benchmarks/results/soak.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import struct
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx

from resnet_serve.client import AsyncClient, ClientError

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS, percentile, spawned_server, unique  # noqa: E402
from images import default_images  # noqa: E402
from machine import save_metrics  # noqa: E402


def bad_inputs(photo: bytes) -> list[tuple[str, bytes]]:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b""))
    return [("empty", b""), ("text", b"not an image at all"), ("truncated", photo[: len(photo) // 2]),
            ("bomb", bomb), ("oversized", b"\xff\xd8\xff" + bytes(11 * 1024 * 1024))]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


async def soak(url: str, duration: float, concurrency: int, bad_share: float, seed: int) -> dict[str, object]:
    images = default_images()
    bad = bad_inputs(images[0])
    rng = random.Random(seed)
    statuses: Counter[str] = Counter()
    good_latencies: list[float] = []
    async with AsyncClient(url, timeout=30) as client:
        end = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < end:
                is_bad = rng.random() < bad_share
                name, data = rng.choice(bad) if is_bad else ("good", unique(rng.choice(images)))
                start = time.perf_counter()
                kind = "bad" if is_bad else "good"
                try:
                    await client.predict(data, filename=f"{name}.jpg")
                    key = f"{kind} 200"
                except ClientError as exc:
                    key = f"{kind} {exc.status}"
                except httpx.HTTPError as exc:
                    key = f"{kind} {type(exc).__name__}"
                statuses[key] += 1
                if not is_bad and key == "good 200":
                    good_latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "good_p50_ms": round(percentile(good_latencies, 50), 1),
        "good_p99_ms": round(percentile(good_latencies, 99), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url")
    target.add_argument("--spawn", action="store_true")
    parser.add_argument("--pid", type=int, help="the server's pid, to read its RSS (with --url)")
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad", type=float, default=0.3, help="share of hostile requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="soak")
    args = parser.parse_args(argv)

    target = spawned_server({}) if args.spawn else contextlib.nullcontext((args.url, None))
    with target as (url, process):
        pid = process.pid if process else args.pid
        asyncio.run(soak(url, min(10.0, args.duration / 4), args.concurrency, args.bad, args.seed + 1))
        rss_start = rss_mb(pid)  # after a warm-up round, so allocator growth to steady state is excluded
        result = asyncio.run(soak(url, args.duration, args.concurrency, args.bad, args.seed))
        rss_end = rss_mb(pid)
    report = {"duration_s": args.duration, "concurrency": args.concurrency, "bad_share": args.bad,
              **result, "rss_mb_start": rss_start, "rss_mb_end": rss_end,
              "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2) if rss_start and rss_end else None}
    save_metrics(report, RESULTS / args.out)
    unexpected = [k for k in result["statuses"] if not k.endswith((" 200", " 400", " 413", " 415", " 503"))]  # type: ignore[union-attr]
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
