"""Per-stage costs behind the request path's design choices, each against its alternative.

- resize: the crop-box resize the service uses (``transform.to_pixels``) against torchvision's
  resize-then-crop, on the benchmark photos (decoded once, outside the timing)
- cache key: SHA-256 truncated to 128 bits (``ResultCache.key``) against BLAKE2b-128
- batch 1 through the engine at the fastest precision: the bare backend called on this thread,
  ``Engine.predict`` awaited on one event loop (as the server does), and ``Engine.predict``
  under ``asyncio.run`` per call (how the benchmarks used to time it)

    python benchmarks/stages_bench.py [--repeats 200] [--precision int8]

Writes ``benchmarks/results/stages_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from images import default_images  # noqa: E402
from machine import describe, one_line  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def p50_ms(work: Callable[[], object], repeats: int) -> float:
    for _ in range(max(1, repeats // 10)):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def resize_rows(images: list[bytes], repeats: int) -> list[dict[str, object]]:
    import numpy as np
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from resnet_serve.spec import RESNET18
    from resnet_serve.transform import to_pixels

    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]

    def reference() -> None:
        for image in decoded:
            cropped = F.center_crop(F.resize(image, [RESNET18.resize_size], interpolation=InterpolationMode.BILINEAR),
                                    [RESNET18.crop_size])
            np.array(cropped).transpose(2, 0, 1)

    def crop_box() -> None:
        for image in decoded:
            to_pixels(image, RESNET18)

    n = len(decoded)
    return [
        {"stage": "resize + crop", "variant": "torchvision resize, then crop", "ms": round(p50_ms(reference, repeats) / n, 3)},
        {"stage": "resize + crop", "variant": "crop box, two passes (service)", "ms": round(p50_ms(crop_box, repeats) / n, 3)},
    ]


def hash_rows(images: list[bytes], repeats: int) -> list[dict[str, object]]:
    from resnet_serve.cache import ResultCache

    def blake() -> None:
        for data in images:
            hashlib.blake2b(data, digest_size=16).digest()

    def service() -> None:
        for data in images:
            ResultCache.key(data)

    n = len(images)
    size_kb = round(statistics.mean(len(d) for d in images) / 1024, 1)
    return [
        {"stage": f"cache key ({size_kb} KB upload)", "variant": "BLAKE2b-128", "ms": round(p50_ms(blake, repeats) / n, 4)},
        {"stage": f"cache key ({size_kb} KB upload)", "variant": "SHA-256/128 (service)", "ms": round(p50_ms(service, repeats) / n, 4)},
    ]


def engine_rows(precision: str, repeats: int) -> list[dict[str, object]]:
    import numpy as np

    from resnet_serve.loading import open_model
    from resnet_serve.settings import Settings
    from resnet_serve.spec import RESNET18

    settings = Settings(precision=precision, max_batch_size=1)  # type: ignore[arg-type]
    engine = open_model(settings)
    image = np.zeros((3, RESNET18.crop_size, RESNET18.crop_size), dtype=np.uint8)
    backend = engine._backend  # the bare backend, as a reference point only

    def bare() -> None:
        backend.run(image[np.newaxis])

    async def on_one_loop() -> float:
        async def call() -> None:
            await engine.predict([image])

        for _ in range(max(1, repeats // 10)):
            await call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            await call()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 3)

    stage = f"{precision} batch 1"
    try:
        return [
            {"stage": stage, "variant": "bare backend on the calling thread", "ms": p50_ms(bare, repeats)},
            {"stage": stage, "variant": "Engine.predict on one event loop (server)", "ms": asyncio.run(on_one_loop())},
            {"stage": stage, "variant": "Engine.predict, asyncio.run per call",
             "ms": p50_ms(lambda: asyncio.run(engine.predict([image])), repeats)},
        ]
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--precision", default="int8", help="for the batch-1 rows (default: the fastest)")
    parser.add_argument("--out", default="stages_bench")
    args = parser.parse_args(argv)

    images = default_images()
    rows = resize_rows(images, args.repeats) + hash_rows(images, args.repeats)
    rows += engine_rows(args.precision, max(10, args.repeats // 4))
    machine = describe()
    lines = ["| stage | variant | p50 ms (per image) |", "|---|---|---:|"]
    lines += [f"| {r['stage']} | {r['variant']} | {r['ms']} |" for r in rows]
    text = "\n".join(lines) + f"\n\nMachine: {one_line(machine)}."
    print(text)
    RESULTS.mkdir(exist_ok=True)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"machine": machine, "command": command, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
