"""``resnet-serve``: serve a model repository, export models into one, classify files offline."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from resnet_serve.errors import (
    ExportError,
    OutputClosed,
    OutputFailed,
    RepositoryError,
    ServerRefused,
    ServerUnreachable,
    WeightsError,
)
from resnet_serve.logs import configure_logging
from resnet_serve.repository import ONNX_PRECISIONS
from resnet_serve.settings import DEFAULT_TOP_K, MAX_TOP_K, Settings, unknown_variables

TORCH_EXTRA = "pip install 'resnet-serve[torch]'"
INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)
PIPE_CLOSED = 141  # and for one whose reader went away (128 + SIGPIPE)
SERVE_FLAGS = ("host", "port", "workers", "device", "precision", "runtime", "model_repository", "default_model",
               "log_level")


def imports_done(*, freeze: bool = False) -> None:
    """Resume the garbage collector ``resnet_serve.__main__`` paused for start-up's imports (a
    no-op if it runs). ``freeze``: first move all that start-up made, which lives as long as the
    server, out of the collector's sight (``gc.freeze``), so later collections skip it."""
    if freeze:
        gc.freeze()
    gc.enable()


def _serve_settings(args: argparse.Namespace) -> Settings:
    """The settings the server runs with, set up for its workers and for a clean stop."""
    # Workers are separate processes that build their own Settings, so flags travel as env.
    for name in SERVE_FLAGS:
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
    return settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from resnet_serve.http.connections import HeaderLimits

    settings = _serve_settings(args)
    if settings.workers == 1:
        import resnet_serve.http.app  # noqa: F401  (now, before the GC resumes; uvicorn finds it imported)
    imports_done(freeze=True)
    # Run here rather than by uvicorn.run, for two reasons. The socket is bound first, so a port
    # in use fails at once, not after the model has loaded (uvicorn binds after the app's
    # startup). And uvicorn.run returns as after a clean stop when a worker of several fails to
    # start: the exit status must say that the server never served.
    from uvicorn.main import STARTUP_FAILURE  # the status uvicorn exits with when the app never started
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "resnet_serve.http.app:create_app", factory=True, host=settings.host, port=settings.port,
        workers=settings.workers, log_level=settings.log_level,
        access_log=False,  # resnet_serve.access logs one line per request, with its ID
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
        http=HeaderLimits,  # request headers within the keep-alive timeout and 64 kB, or the connection closes
    )
    configure_logging(settings.log_format, settings.log_level)  # over the loggers uvicorn.Config just set
    _warn_unknown_variables()
    socket = config.bind_socket()  # exits with STARTUP_FAILURE, the error logged, if it cannot bind
    if settings.workers == 1:
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[socket])
        return 0 if server.started else STARTUP_FAILURE
    supervisor = Multiprocess(config, sockets=[socket])
    supervisor.run()
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


def _predict(args: argparse.Namespace) -> int:
    from resnet_serve import bulk

    inputs = bulk.find_inputs(args.paths)
    if not inputs:  # a glob that matches nothing, a folder with no image: say so before loading a model
        print(f"error: no image found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    skipped = 0
    if args.resume and args.output is not None:
        done = bulk.done_paths(args.output)
        skipped = len(inputs)
        inputs = [path for path in inputs if str(path) not in done]
        skipped -= len(inputs)
    sink = bulk.FileSink(args.output) if args.output else bulk.TextSink(sys.stdout, sys.stderr)
    progress = bulk.Progress(len(inputs), quiet=args.quiet, stream=sys.stderr)
    try:
        if args.server:
            summary = asyncio.run(bulk.run_remote(inputs, args.server, sink, model=args.model, k=args.top_k,
                                                  concurrency=args.concurrency,
                                                  api_key=args.api_key or os.environ.get("RESNET_SERVE_API_KEY"),
                                                  ordered=not args.unordered, progress=progress))
        else:
            summary, info = asyncio.run(bulk.run_offline(inputs, Settings(), sink, model=args.model, k=args.top_k,
                                                         ordered=not args.unordered, progress=progress))
            if info.weights.is_random:
                print("WARNING: random-init weights; these predictions are meaningless", file=sys.stderr)
    except KeyboardInterrupt:  # asyncio.run cancelled the run: the inputs in flight got no row
        progress.close()
        kept = "" if args.output is None else f"; {args.output} keeps the rows written, and --resume continues"
        print(f"stopped{kept}", file=sys.stderr)
        return INTERRUPTED
    finally:
        progress.close()
        sink.close()
    summary.skipped = skipped
    if not args.quiet:
        print(summary.line(), file=sys.stderr)
    return 1 if summary.failed and not summary.ok else 0


def _download(args: argparse.Namespace) -> int:
    from resnet_serve.backends.torch.checkpoints import download
    from resnet_serve.spec import builtin_spec
    from resnet_serve.weights import verify_file

    path = download(builtin_spec(Settings().default_model or "resnet18"), args.dir, progress=True)
    print(f"{path}  sha256={verify_file(path)}")
    return 0


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def _server_url(text: str) -> str:
    """As curl takes it: ``host:port`` means ``http://host:port``."""
    return text if "://" in text else f"http://{text}"


def _comma_choices(*choices: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of ``choices``, checked before any work starts."""
    def parse(text: str) -> list[str]:
        items = _comma_list(text)
        wrong = [item for item in items if item not in choices]
        if wrong or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(wrong) or repr(text)}: choose from {','.join(choices)}")
        return items
    return parse


def _export(args: argparse.Namespace) -> int:
    from resnet_serve.backends.torch import export
    from resnet_serve.labels import read_labels
    from resnet_serve.repository import Batching, Geometry

    settings = Settings()
    overrides = {"resize_size": args.resize, "crop_size": args.crop, "interpolation": args.interpolation,
                 "mean": args.mean, "std": args.std}
    try:
        geometry = Geometry.model_validate({**export.default_geometry(args.arch).model_dump(),
                                            **{k: v for k, v in overrides.items() if v is not None}})
        batching = Batching(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)
    except ValidationError as exc:
        raise ExportError("; ".join(_flag_errors(exc))) from None
    try:
        labels = read_labels(args.labels) if args.labels else None
    except (OSError, ValueError) as exc:
        raise ExportError(f"--labels {args.labels}: {exc}") from None
    name = args.name or args.arch
    spec, weights = export.model_inputs(args.arch, args.weights, labels, name, geometry, settings)
    onnx = importlib.util.find_spec("onnx") is not None and bool(set(args.precision) & set(ONNX_PRECISIONS))
    formats = args.format or ["torchscript", *(["onnx"] if onnx else []), "state_dict"]
    job = export.ExportJob(
        spec=spec, weights=weights, repository=args.repository,
        version=args.version or export.next_version(args.repository, name), formats=formats,
        precisions=args.precision, channels_last=not args.no_channels_last, int8_backend=args.int8_backend,
        calibration=args.calibration, batching=batching,
        explain_layer=args.explain_layer,
    )
    version = export.export(job, progress=lambda message: print(message, file=sys.stderr, flush=True))
    assert version.metadata is not None
    print(f"wrote {version.directory} ({spec.architecture}, {spec.num_classes} classes, "
          f"{weights.info.source} weights)")
    for artefact in version.metadata.artefacts:
        v = artefact.validation
        figures = f"max |Δp| {v.max_abs_diff:.1e}, top-1 agreement {v.top1_agreement:.0%}" if v else ""
        print(f"  {artefact.file}  {artefact.bytes / 1e6:.1f} MB  {figures}")
    print(f"serve it with: resnet-serve serve --model-repository {args.repository}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from resnet_serve.backends.torch import export

    for arch in export.classification_architectures():
        g = export.default_geometry(arch)
        official = "official weights" if export.default_weights(arch) is not None else "no official weights"
        print(f"{arch:<28} {g.resize_size}/{g.crop_size} {g.interpolation:<8} {official}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from resnet_serve.loading import default_root, default_spec, wanted_artefacts
    from resnet_serve.weights import locate

    settings = Settings()
    spec = default_spec(settings)
    found = locate(spec, weights=settings.weights, weights_dir=settings.weights_dir,
                   random=settings.weights_mode == "random")
    wanted = wanted_artefacts(settings)
    report = {
        "torch": _installed("torch"),
        "onnxruntime": _installed("onnxruntime"),
        "openvino": _installed("openvino"),
        "repository": str(settings.model_repository or default_root(settings)),
        "artefacts": list(dict.fromkeys(f"{w.format} {w.precision}" for w in wanted)),
        "weights": found.source if found else "not found locally",
        "weights_path": str(found.path) if found and found.path else None,
        "weights_sha256": found.sha256 if found else None,
        "settings": json.loads(settings.model_dump_json()),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _installed(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _serve_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="processes, each with its own models")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    serve.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16", "int8"])
    serve.add_argument("--runtime", choices=["auto", "torchscript", "onnxruntime", "openvino"])
    serve.add_argument("--model-repository", type=Path, help="serve every model in this repository")
    serve.add_argument("--default-model", help="the model /predict serves without ?model=")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=_serve)


def _export_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    export = commands.add_parser(
        "export", help="export a torchvision classifier into a model repository",
        description="Compile a torchvision classifier with its weights and labels into "
                    "<repository>/<name>/<version>/, validated against eager PyTorch on real photos. "
                    "Architectures: see 'resnet-serve models'.")
    export.add_argument("--arch", default="resnet18", help="a torchvision.models classifier (default resnet18)")
    export.add_argument("--weights", default="official", help="official, random, or a checkpoint file")
    export.add_argument("--labels", type=Path, help=".txt, .json or .tsv (default: ImageNet for 1000 classes)")
    export.add_argument("--name", help="model name, [a-z0-9_.-] (default: the architecture)")
    export.add_argument("--repository", type=Path, required=True)
    export.add_argument("--version", type=_positive_int, help="default: one more than the latest")
    export.add_argument("--format", type=_comma_choices("torchscript", "onnx", "state_dict"),
                        help="torchscript,onnx,state_dict (default: all three; onnx where it is installed and "
                             "for fp32 and int8, the precisions ONNX artefacts have). "
                             "state_dict: the FP32 weights that explanations (POST /explain) run on")
    export.add_argument("--precision", type=_comma_choices("fp32", "int8", "bf16", "fp16"), default=["fp32"],
                        help="fp32,int8,bf16,fp16 (default fp32)")
    export.add_argument("--calibration", type=Path, help="photos for INT8 and validation (default: scikit-image's)")
    export.add_argument("--int8-backend", choices=["x86", "fbgemm", "onednn"], default="x86")
    export.add_argument("--no-channels-last", action="store_true", help="NCHW graphs (default: NHWC on the CPU)")
    export.add_argument("--resize", type=int, help="override the architecture's resize size")
    export.add_argument("--crop", type=int, help="override the architecture's crop size")
    export.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"])
    export.add_argument("--mean", type=float, nargs=3)
    export.add_argument("--std", type=float, nargs=3)
    export.add_argument("--max-batch-size", type=int, help="this model's batch size (default: the server's)")
    export.add_argument("--explain-layer", help="the module explanations look at, e.g. layer4 "
                                                "(default: the last convolutional block)")
    export.add_argument("--max-wait-ms", type=float, help="this model's batching window (default: the server's)")
    export.set_defaults(run=_export)


def _predict_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    predict = commands.add_parser(
        "predict", help="classify files and folders, offline or through a running server",
        description="Classify image files: paths, folders (recursive), globs, or '-' for paths on stdin. "
                    "One row per input (errors included), written as they finish, in constant memory.")
    predict.add_argument("paths", nargs="+", metavar="PATH")
    predict.add_argument("--output", type=Path, help="FILE.csv or FILE.jsonl (default: readable text on stdout)")
    predict.add_argument("--resume", action="store_true", help="skip the inputs --output already has a row for")
    predict.add_argument("--unordered", action="store_true", help="write rows as they finish, not in input order")
    predict.add_argument("--model", help="a model of the repository (default: the default model)")
    predict.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, choices=range(1, MAX_TOP_K + 1),
                         metavar=f"1..{MAX_TOP_K}")
    predict.add_argument("--server", type=_server_url,
                         help="a running server's URL instead of a model in this process (http:// if none is given)")
    predict.add_argument("--concurrency", type=_positive_int, default=8, help="requests at once with --server")
    predict.add_argument("--api-key", help="the server's API key (or RESNET_SERVE_API_KEY)")
    predict.add_argument("--quiet", action="store_true", help="no progress and no summary")
    predict.set_defaults(run=_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_parser(commands)
    _export_parser(commands)
    _predict_parser(commands)
    download = commands.add_parser("download-weights", help="fetch and verify the official ResNet-18 weights")
    download.add_argument("--dir", type=Path, default=Path("weights"))
    download.set_defaults(run=_download)
    commands.add_parser("models", help="the torchvision classifiers export takes").set_defaults(run=_models)
    commands.add_parser("info", help="versions, and the repository and weights that would be served"
                        ).set_defaults(run=_info)
    return parser


EXPORT_FLAGS = {"resize_size": "--resize", "crop_size": "--crop", "interpolation": "--interpolation", "mean": "--mean",
                "std": "--std", "max_batch_size": "--max-batch-size", "max_wait_ms": "--max-wait-ms"}


def _words(error: Any) -> str:
    """A validation error's message: a validator's own words, without pydantic's "Value error, "."""
    return str(error.get("ctx", {}).get("error", error["msg"]))


def _flag_errors(exc: ValidationError) -> list[str]:
    """Each error named by the export flag it came from; a rule between flags by its message."""
    return [f"{EXPORT_FLAGS.get(str(e['loc'][0]), e['loc'][0])}: {_words(e)}" if e["loc"] else _words(e)
            for e in exc.errors()]


def _settings_errors(exc: ValidationError) -> list[str]:
    """One line per bad setting, named as the environment variable it is read from; a rule
    between settings as its own message, which names them."""
    return [f"RESNET_SERVE_{str(e['loc'][0]).upper()}={e['input']!r}: {_words(e)}" if e["loc"] else _words(e)
            for e in exc.errors()]


def _warn_unknown_variables() -> None:
    for line in unknown_variables():
        logging.getLogger("resnet_serve.settings").warning(line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run is not _serve:
        imports_done()  # the other commands work long after their imports: collect as usual
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury predict's progress
    if args.run is not _serve:  # serve says it once its logging is set up
        _warn_unknown_variables()
    try:
        return int(args.run(args))
    except OutputClosed:  # | head: stop as the shell's tools do, with no error and nothing left to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED
    except (WeightsError, RepositoryError, ExportError, ServerUnreachable, ServerRefused, OutputFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        print("error: invalid settings (flags travel as these variables):", *_settings_errors(exc), sep="\n  ",
              file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "torchvision", "onnx"):
            print(f"error: '{args.command}' needs {exc.name}, which the slim install leaves out: {TORCH_EXTRA}",
                  file=sys.stderr)
            return 2
        if exc.name == "httpx":
            print("error: --server needs the client: pip install 'resnet-serve[client]'", file=sys.stderr)
            return 2
        raise
