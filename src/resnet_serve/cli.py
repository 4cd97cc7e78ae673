"""``resnet-serve``: serve, predict offline, download the weights, show what would run."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from resnet_serve.errors import ServeError, WeightsError
from resnet_serve.settings import DEFAULT_TOP_K, MAX_TOP_K, Settings
from resnet_serve.spec import builtin_spec


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # Workers are separate processes that build their own Settings, so flags travel as env.
    for name in ("host", "port", "workers", "device", "precision", "log_level"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"RESNET_SERVE_{name.upper()}"] = str(value)
    settings = Settings()
    if settings.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Each worker is its own process; /metrics must add them up (prometheus-client's
        # multiprocess mode). The folder must exist, and be empty, before the workers start.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="resnet-serve-metrics-")
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal with the handler
    # it found installed. With this one in place that re-raise is a no-op: a drained server
    # exits 0, as orchestrators expect of a clean stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        "resnet_serve.http.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=False,  # resnet_serve.access logs one line per request, with its ID
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from resnet_serve.loading import load_engine, resolve
    from resnet_serve.results import top_k
    from resnet_serve.transform import preprocess

    settings = Settings()
    spec = builtin_spec(settings.default_model)
    images = []
    for path in args.images:
        try:
            images.append((path, preprocess(Path(path).read_bytes(), spec, max_pixels=settings.max_pixels)))
        except (OSError, ServeError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
    if not images:
        return 1
    weights = resolve(spec, settings)
    engine = load_engine(spec, weights, settings.model_copy(update={"max_batch_size": 1}))
    try:
        predictions = asyncio.run(engine.predict([image.pixels for _, image in images]))
    finally:
        engine.close()
    if weights.info.is_random:
        print("WARNING: random-init weights; these predictions are meaningless\n", file=sys.stderr)
    labels = spec.labels
    for (path, _), prediction in zip(images, predictions):
        print(path)
        for rank, (p, i) in enumerate(zip(*top_k(prediction.probs, args.top_k)), start=1):
            print(f"  {rank:>2}. {p * 100:6.2f}%  {i:>3}  {labels.en[i]}  ({labels.zh[i]})")
    return 0


def _download(args: argparse.Namespace) -> int:
    from resnet_serve.backends.torch.checkpoints import download
    from resnet_serve.weights import verify_file

    path = download(builtin_spec(Settings().default_model), args.dir, progress=True)
    print(f"{path}  sha256={verify_file(path)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from resnet_serve.backends.torch.compile import CompileOptions, load_or_compile
    from resnet_serve.loading import resolve

    overrides = {"precision": args.precision} if args.precision else {}
    settings = Settings().model_copy(update=overrides)
    spec = builtin_spec(settings.default_model)
    weights = resolve(spec, settings)
    if args.format == "onnx":
        from resnet_serve.backends.torch.onnx_export import export_onnx

        path = export_onnx(spec, weights, args.output)
    else:
        options = CompileOptions.from_settings(settings)
        model, _ = load_or_compile(spec, weights, options, None)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(model, str(args.output))
        path = args.output
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {weights.info.source} weights)")
    print(f"input: uint8 [N, 3, {spec.crop_size}, {spec.crop_size}] RGB pixels; "
          f"output: float32 [N, {spec.num_classes}] probabilities")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import torch

    from resnet_serve.backends.torch.compile import CompileOptions, load_or_compile
    from resnet_serve.backends.torch.quantize import calibration_files, load_calibration_batch
    from resnet_serve.loading import resolve
    from resnet_serve.results import top_k

    update: dict[str, object] = {"precision": "int8", "device": "cpu"}
    if args.calibration_dir:
        update["calibration_dir"] = args.calibration_dir
    if args.backend:
        update["int8_backend"] = args.backend
    settings = Settings().model_copy(update=update)
    spec = builtin_spec(settings.default_model)
    weights = resolve(spec, settings)
    int8_options = CompileOptions.from_settings(settings)
    cache = settings.compiled_cache_dir / int8_options.cache_name(spec, weights.info)
    int8, _ = load_or_compile(spec, weights, int8_options, cache)
    fp32, _ = load_or_compile(spec, weights, CompileOptions(torch.device("cpu"), "fp32", True), None)
    files = calibration_files(settings.calibration_dir)
    batch = load_calibration_batch(files, spec)
    with torch.inference_mode():
        q, f = int8(batch).numpy(), fp32(batch).numpy()
    top1 = float((q.argmax(1) == f.argmax(1)).mean())
    top5 = sum(len(set(top_k(a, 5)[1]) & set(top_k(b, 5)[1])) for a, b in zip(q, f))
    print(f"INT8 ({int8_options.int8_backend}) calibrated on {len(files)} images; cached as {cache}")
    print(f"agreement with FP32 on those images: top-1 {top1:.1%}, top-5 overlap {top5 / (5 * len(q)):.1%}")
    if weights.info.is_random:
        print("note: random-init weights; agreement on real weights must be measured with them")
    print("serve it with: RESNET_SERVE_PRECISION=int8"
          + (f" RESNET_SERVE_CALIBRATION_DIR={args.calibration_dir}" if args.calibration_dir else "")
          + " resnet-serve serve")
    if args.output:
        torch.jit.save(int8, str(args.output))
        print(f"wrote {args.output}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch
    import torchvision

    from resnet_serve.backends.torch.runtime import select_device
    from resnet_serve.loading import resolve

    settings = Settings().model_copy(update={"allow_download": False})
    weights = resolve(builtin_spec(settings.default_model), settings)
    report = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(select_device(settings.device)),
        "cuda_available": torch.cuda.is_available(),
        "mps_available": torch.backends.mps.is_available(),
        "weights": weights.info.source,
        "weights_path": str(weights.info.path) if weights.info.path else None,
        "weights_sha256": weights.info.sha256,
        "settings": json.loads(settings.model_dump_json()),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="processes, each with its own model")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    serve.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16", "int8"])
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=_serve)

    predict = commands.add_parser("predict", help="classify image files offline")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, choices=range(1, MAX_TOP_K + 1),
                         metavar=f"1..{MAX_TOP_K}")
    predict.set_defaults(run=_predict)

    download = commands.add_parser("download-weights", help="fetch and verify the official weights")
    download.add_argument("--dir", type=Path, default=Path("weights"))
    download.set_defaults(run=_download)

    export = commands.add_parser("export", help="write a deployable TorchScript or ONNX model")
    export.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    export.add_argument("--output", type=Path, required=True)
    export.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"])
    export.set_defaults(run=_export)

    quantize = commands.add_parser("quantize", help="calibrate and cache the INT8 model (CPU)")
    quantize.add_argument("--calibration-dir", type=Path, help="photos (default: scikit-image's samples)")
    quantize.add_argument("--backend", choices=["x86", "fbgemm", "onednn"])
    quantize.add_argument("--output", type=Path, help="also write the INT8 TorchScript file here")
    quantize.set_defaults(run=_quantize)

    info = commands.add_parser("info", help="versions, device and the weights that would load")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
