"""Top-1 / Top-5 accuracy of each precision on an ImageNet validation folder.

    python benchmarks/accuracy.py --data ~/imagenet/val --precisions fp32 int8

The folder has one sub-folder per class, named either by class index (``0`` … ``999``) or by
WordNet ID (``n01440764`` …, all 1000 of them, whose sorted order is the class index, as in
torchvision's ImageNet). With the official weights, torchvision reports 69.76% / 89.08% for
FP32 and 69.49% / 88.88% for its own INT8 ResNet-18; this script checks ours against those.
Writes ``benchmarks/results/accuracy.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

from resnet_serve.photos import IMAGE_SUFFIXES

REFERENCE = {"fp32": (69.758, 89.078), "int8": (69.494, 88.882)}  # torchvision's published figures
WNID = re.compile(r"n\d{8}")


def labelled_files(root: Path) -> list[tuple[Path, int]]:
    """(image, class index) for every image under ``root``'s class folders."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise SystemExit(f"{root} has no class folders")
    if all(f.name.isdigit() for f in folders):
        index = {f: int(f.name) for f in folders}
    elif all(WNID.fullmatch(f.name) for f in folders):
        if len(folders) != 1000:
            raise SystemExit("WordNet-ID folders must be all 1000 classes (their order is the index)")
        index = {f: i for i, f in enumerate(folders)}
    else:
        raise SystemExit("class folders must be named 0-999 or by WordNet ID")
    if any(not 0 <= i < 1000 for i in index.values()):
        raise SystemExit("class indices must be 0-999")
    return [(p, index[f]) for f in folders for p in sorted(f.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def evaluate(files: list[tuple[Path, int]], precision: str, batch_size: int) -> dict[str, object]:
    from resnet_serve.errors import ServeError
    from resnet_serve.loading import open_model
    from resnet_serve.results import top_k
    from resnet_serve.settings import Settings
    from resnet_serve.transform import preprocess

    settings = Settings(precision=precision, max_batch_size=batch_size)  # type: ignore[arg-type]
    engine = open_model(settings)
    spec = engine.info.spec
    top1 = top5 = seen = skipped = 0
    try:
        for start in range(0, len(files), batch_size):
            tensors, labels = [], []
            for path, label in files[start : start + batch_size]:
                try:
                    tensors.append(preprocess(path.read_bytes(), spec, max_pixels=10**9).pixels)
                    labels.append(label)
                except ServeError:
                    skipped += 1
            if not tensors:
                continue
            for prediction, label in zip(asyncio.run(engine.predict(tensors)), labels):
                best = top_k(prediction.probs, 5)[1]
                top1 += best[0] == label
                top5 += label in best
                seen += 1
    finally:
        engine.close()
    return {
        "precision": precision, "weights": engine.info.weights.source, "images": seen, "skipped": skipped,
        "top1": round(100 * top1 / max(seen, 1), 3), "top5": round(100 * top5 / max(seen, 1), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--out", default="accuracy")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    files = labelled_files(args.data)[: args.limit]
    rows = [evaluate(files, p, args.batch_size) for p in args.precisions]
    lines = ["| precision | weights | images | top-1 % | top-5 % | torchvision reference |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        ref = REFERENCE.get(str(r["precision"]))
        lines.append(f"| {r['precision']} | {r['weights']} | {r['images']} | {r['top1']} | {r['top5']} | "
                     f"{f'{ref[0]} / {ref[1]} (official weights, full val set)' if ref else '-'} |")
    table = "\n".join(lines)
    print(table)
    if any(r["weights"] != "official" for r in rows):
        print("note: not the official weights: these figures say nothing about ResNet-18's accuracy", file=sys.stderr)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.out}.json").write_text(json.dumps({"data": str(args.data), "results": rows}, indent=2) + "\n")
    (args.results_dir / f"{args.out}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
