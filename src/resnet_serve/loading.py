"""From settings to a warmed engine: find the weights, build the configured runtime's backend
(or load it from the compiled-model cache), wrap it in an ``Engine`` and warm it up.

This is the one place that knows which runtime module to import; each is imported only when it
is the one configured, so a process that serves ONNX Runtime never loads TorchScript's, and the
modules above this one never import a runtime at all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from resnet_serve.backends import Backend
from resnet_serve.backends.torch.checkpoints import LoadedWeights, resolve
from resnet_serve.backends.torch.compile import CompileOptions, load_or_compile
from resnet_serve.inference import Engine, ModelInfo
from resnet_serve.settings import Settings
from resnet_serve.spec import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["LoadedWeights", "load_engine", "resolve"]


def _onnxruntime_backend(spec: ModelSpec, weights: LoadedWeights, options: CompileOptions,
                         settings: Settings) -> tuple[Backend, str]:
    """The ONNX Runtime alternative: FP32 on the CPU, exported once and cached like the rest."""
    from resnet_serve.backends.onnxruntime import OnnxRuntimeBackend
    from resnet_serve.backends.torch.onnx_export import export_onnx

    if options.device.type != "cpu" or options.precision != "fp32":
        raise RuntimeError("RESNET_SERVE_RUNTIME=onnxruntime runs FP32 on the CPU only")
    path = settings.compiled_cache_dir / Path(options.cache_name(spec, weights.info)).with_suffix(".onnx")
    source = "cache"
    if not (settings.compiled_cache and path.is_file()):
        export_onnx(spec, weights, path)
        source = "compiled"
    return OnnxRuntimeBackend(path, threads=settings.ort_threads), source


def _torchscript_backend(spec: ModelSpec, weights: LoadedWeights, options: CompileOptions,
                         settings: Settings) -> tuple[Backend, str]:
    from resnet_serve.backends.torch.runtime import TorchScriptBackend

    cache = settings.compiled_cache_dir / options.cache_name(spec, weights.info) if settings.compiled_cache else None
    model, source = load_or_compile(spec, weights, options, cache)
    backend = TorchScriptBackend(model, device=options.device, precision=options.precision,
                                 threads=settings.torch_threads)
    return backend, source


def load_engine(spec: ModelSpec, weights: LoadedWeights, settings: Settings) -> Engine:
    """Build (or load from the on-disk cache) the model for the configured runtime, device and
    precision, then warm it up."""
    import torch

    torch.set_num_threads(settings.torch_threads)
    start = time.perf_counter()
    options = CompileOptions.from_settings(settings)
    if settings.runtime == "onnxruntime":
        backend, source = _onnxruntime_backend(spec, weights, options, settings)
        threads, channels_last = settings.ort_threads, False
    else:
        backend, source = _torchscript_backend(spec, weights, options, settings)
        threads, channels_last = settings.torch_threads, options.channels_last
    info = ModelInfo(
        name=spec.name, device=backend.device, precision=backend.precision, weights=weights.info,
        threads=threads, runtime=backend.runtime, channels_last=channels_last, compiled_from=source,
    )
    engine = Engine(backend, info)
    engine.warmup(settings.max_batch_size, spec.crop_size)
    info.start_s = round(time.perf_counter() - start, 3)
    logger.info("%s %s (%s) on %s/%s; ready in %.1fs", source, spec.name, backend.runtime, backend.device,
                backend.precision, info.start_s)
    return engine
