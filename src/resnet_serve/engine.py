"""The model and the one thread that runs it.

Concurrency contract:
- One dedicated OS thread (``resnet-serve-inference``) owns the TorchScript module. Nothing
  else ever calls the module, so it needs no lock and torch's intra-op pool is never shared.
- Work reaches it through a ``queue.Queue`` of ``_Job``s: a batch's ``uint8`` images plus a
  ``concurrent.futures.Future``. The thread stacks the images itself, so the event loop never
  waits on the copy. It resolves that future with the probabilities or the exception;
  ``asyncio.wrap_future`` hands the outcome to the event loop with ``call_soon_threadsafe``.
  An exception fails only that job; the thread goes on.
- ``close()`` puts a sentinel behind the jobs already queued, so they finish first; a job
  submitted after ``close()`` fails at once with ``NotReady``.
- If the thread dies anyway (a ``BaseException``), a ``finally`` fails the job it held and every
  queued job with ``NotReady`` (503), and ``Engine`` starts a new thread on the next batch;
  ``alive`` is false in between, so readiness says 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import nn

from resnet_serve.errors import InferenceFailed, NotReady
from resnet_serve.quantize import (
    calibration_files,
    calibration_fingerprint,
    load_calibration_batch,
    quantize_network,
)
from resnet_serve.settings import Settings
from resnet_serve.weights import RANDOM_INIT_SEED, LoadedWeights, ModelSpec, WeightsInfo

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16", "int8"]
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32,
}
WARMUP_ROUNDS = 3
# Bump when Classifier or compile_model change what they build: it invalidates cached artefacts.
GRAPH_VERSION = 1


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit name must be available."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise RuntimeError(f"RESNET_SERVE_DEVICE={name} but no {name} device is available")
    return torch.device(name)


def select_precision(name: str, device: torch.device) -> Precision:
    """``auto`` is FP16 on CUDA (tensor cores), FP32 elsewhere."""
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise RuntimeError("RESNET_SERVE_PRECISION=fp16 needs a CUDA or MPS device")
    if name == "int8" and device.type != "cpu":
        raise RuntimeError("RESNET_SERVE_PRECISION=int8 runs on the CPU only; use fp16 on a GPU")
    if name == "bf16" and device.type == "cpu" and not cpu_has_bf16_kernels():
        logger.warning("oneDNN has no bf16 kernels for this CPU (they need AVX-512); bf16 will be slow here")
    return name  # type: ignore[return-value]


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU: AVX-512 emulates bf16 arithmetic, and
    AVX512-BF16 or AMX run it natively (faster than fp32); without them torch's reference
    kernels run, far slower than fp32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


class Classifier(nn.Module):
    """uint8 NCHW pixels in, float32 probabilities out: normalisation and softmax in the graph."""

    def __init__(self, net: nn.Module, spec: ModelSpec, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.channels_last = channels_last
        scale = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", (torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0).to(dtype))
        self.register_buffer("inv_std", (1.0 / scale).to(dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(self.dtype) - self.mean) * self.inv_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.net(x).float(), dim=1)


@contextlib.contextmanager
def torchscript_quietly() -> Iterator[None]:
    """TorchScript is deprecated upstream in favour of torch.export; it is still the format
    this service ships (the design asks for it), so its notices are not news here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


@dataclass(frozen=True)
class CompileOptions:
    """Everything that decides what ``compile_model`` builds (and so the cache key)."""

    device: torch.device
    precision: Precision
    channels_last: bool
    int8_backend: str = "x86"
    calibration_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> CompileOptions:
        device = select_device(settings.device)
        precision = select_precision(settings.precision, device)
        return cls(
            device=device,
            precision=precision,
            channels_last=settings.channels_last and device.type in ("cpu", "cuda") and precision != "int8",
            int8_backend=settings.int8_backend,
            calibration_dir=settings.calibration_dir,
        )

    def cache_name(self, spec: ModelSpec, weights: WeightsInfo) -> str:
        """A file name that changes whenever the compiled model would."""
        parts = [
            f"graph{GRAPH_VERSION}", torch.__version__, torchvision.__version__, self.device.type,
            self.precision, f"cl{int(self.channels_last)}", weights.sha256 or f"random{RANDOM_INIT_SEED}",
        ]
        if self.precision == "int8":
            files = calibration_files(self.calibration_dir)
            parts += [self.int8_backend, calibration_fingerprint(files)]
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
        return f"{spec.name}-{self.precision}-{self.device.type}-{key}.pt"


def compile_model(spec: ModelSpec, weights: LoadedWeights, options: CompileOptions) -> torch.jit.ScriptModule:
    """Build, load, (quantize,) trace and freeze the classifier on ``options.device``."""
    device, precision = options.device, options.precision
    net = spec.build_module()
    net.load_state_dict(weights.state_dict)
    dtype = _DTYPES[precision]
    net = net.to(device=device, dtype=dtype).eval()
    if precision == "int8":
        calibration = load_calibration_batch(calibration_files(options.calibration_dir), spec)
        net = quantize_network(net, spec, calibration, options.int8_backend)
    if options.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = Classifier(net, spec, dtype, options.channels_last).to(device).eval()
    example = torch.zeros(1, 3, spec.crop_size, spec.crop_size, dtype=torch.uint8, device=device)
    with torch.no_grad(), torchscript_quietly():
        traced = torch.jit.trace(model, example, check_trace=False)
        return torch.jit.freeze(traced)


def _onnxruntime_model(
    spec: ModelSpec, weights: LoadedWeights, options: CompileOptions, settings: Settings, name: str
) -> tuple[nn.Module, str]:
    """The ONNX Runtime alternative: FP32 on the CPU, exported once and cached like the rest."""
    from resnet_serve.ort import OrtModel, export_onnx

    if options.device.type != "cpu" or options.precision != "fp32":
        raise RuntimeError("RESNET_SERVE_RUNTIME=onnxruntime runs FP32 on the CPU only")
    path = settings.compiled_cache_dir / name.replace(".pt", ".onnx")
    source = "cache"
    if not (settings.compiled_cache and path.is_file()):
        export_onnx(spec, weights, path)
        source = "compiled"
    return OrtModel(path, settings.torch_threads), source  # type: ignore[return-value]


def load_or_compile(
    spec: ModelSpec, weights: LoadedWeights, options: CompileOptions, cache: Path | None
) -> tuple[torch.jit.ScriptModule, str]:
    """The compiled model from ``cache`` if it is there, else compiled now (and cached)."""
    if cache is not None and cache.is_file():
        try:
            with torchscript_quietly():
                return torch.jit.load(str(cache), map_location=options.device), "cache"
        except Exception as exc:  # a stale or damaged artefact is rebuilt, not fatal
            logger.warning("ignoring unreadable compiled model %s: %s", cache, exc)
    model = compile_model(spec, weights, options)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(".partial")
            with torchscript_quietly():
                torch.jit.save(model, str(partial))
            partial.replace(cache)
        except OSError as exc:
            logger.warning("could not cache the compiled model in %s: %s", cache, exc)
    return model, "compiled"


@dataclass(frozen=True)
class Prediction:
    """One image's output and the batch it ran in."""

    probs: torch.Tensor
    inference_ms: float
    batch_size: int


@dataclass
class ModelInfo:
    """What ``/model`` reports."""

    name: str
    device: str
    precision: Precision
    weights: WeightsInfo
    torch_threads: int
    channels_last: bool = False
    compiled_from: str = "compiled"
    start_s: float = 0.0
    warmup_batch_ms: dict[int, float] = field(default_factory=dict)


@dataclass
class _Job:
    images: list[torch.Tensor]
    future: concurrent.futures.Future[tuple[torch.Tensor, float]]


_STOP = object()


class InferenceThread:
    """Runs a callable on batches, one at a time, on its own thread."""

    def __init__(self, model: torch.jit.ScriptModule | nn.Module, device: torch.device, threads: int):
        self._model = model
        self._device = device
        self._threads = threads
        self._jobs: queue.Queue[_Job | object] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # orders submit() against close and death
        self._thread = threading.Thread(target=self._run, name="resnet-serve-inference", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        job: _Job | None = None
        try:
            while True:
                item = self._jobs.get()
                if item is _STOP:
                    return
                assert isinstance(item, _Job)
                job = item
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(self._forward(job.images))
                    except Exception as exc:  # the job fails; the thread lives on
                        job.future.set_exception(exc)
                job = None
        except BaseException:
            logger.critical("the inference thread died", exc_info=True)
        finally:
            self._fail_leftovers(job)

    def _fail_leftovers(self, current: _Job | None) -> None:
        """If the thread dies, no job it holds or that waits for it may hang."""
        with self._lock:
            self._closed = True
        died = NotReady("the inference thread stopped; the request was not run")
        if current is not None and not current.future.done():
            current.future.set_exception(died)
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(died)

    def _forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Probabilities for the stacked batch, and the forward pass's own time in ms."""
        with torch.inference_mode():
            batch = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)
            start = time.perf_counter()
            probs = self._model(batch.to(self._device, non_blocking=True)).cpu()
        return probs, (time.perf_counter() - start) * 1000.0

    def submit(self, images: list[torch.Tensor]) -> concurrent.futures.Future[tuple[torch.Tensor, float]]:
        future: concurrent.futures.Future[tuple[torch.Tensor, float]] = concurrent.futures.Future()
        with self._lock:
            if not self._closed:
                self._jobs.put(_Job(images, future))
                return future
        future.set_exception(NotReady("the inference thread is shut down"))
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then stop the thread."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._jobs.put(_STOP)
        self._thread.join(timeout)


class Engine:
    """The compiled model behind its inference thread, with an async ``predict``."""

    def __init__(self, model: torch.jit.ScriptModule | nn.Module, info: ModelInfo, crop_size: int):
        self.info = info
        self.restarts = 0
        self._model = model
        self._crop_size = crop_size
        self._closed = False
        self._thread = self._start_thread()

    def _start_thread(self) -> InferenceThread:
        return InferenceThread(self._model, torch.device(self.info.device), self.info.torch_threads)

    def ensure_running(self) -> None:
        """Restart the inference thread if it died (its jobs were already failed with 503)."""
        if not self._closed and not self._thread.alive:
            self.restarts += 1
            logger.error("the inference thread died; restarting it (restart %d)", self.restarts)
            self._thread = self._start_thread()

    @classmethod
    def load(cls, spec: ModelSpec, weights: LoadedWeights, settings: Settings) -> Engine:
        """Compile (or load from the on-disk cache) for the configured device and precision,
        then warm up."""
        torch.set_num_threads(settings.torch_threads)
        options = CompileOptions.from_settings(settings)
        if options.precision == "int8":
            torch.backends.quantized.engine = options.int8_backend
        start = time.perf_counter()
        name = options.cache_name(spec, weights.info)
        if settings.runtime == "onnxruntime":
            model, source = _onnxruntime_model(spec, weights, options, settings, name)
        else:
            cache = settings.compiled_cache_dir / name if settings.compiled_cache else None
            model, source = load_or_compile(spec, weights, options, cache)
        info = ModelInfo(
            name=spec.name,
            device=str(options.device),
            precision=options.precision,
            weights=weights.info,
            torch_threads=settings.torch_threads,
            channels_last=options.channels_last,
            compiled_from=source,
        )
        engine = cls(model, info, spec.crop_size)
        engine.warmup(settings.max_batch_size)
        info.start_s = round(time.perf_counter() - start, 3)
        logger.info("%s %s on %s/%s; ready in %.1fs", source, spec.name, options.device, options.precision, info.start_s)
        return engine

    def warmup(self, max_batch_size: int) -> None:
        """Run every batch size a few times: TorchScript's first calls optimise the graph."""
        size = self._crop_size
        for n in range(1, max_batch_size + 1):
            images = [torch.zeros(3, size, size, dtype=torch.uint8)] * n
            for _ in range(WARMUP_ROUNDS):
                _, elapsed = self._thread.submit(images).result()
            self.info.warmup_batch_ms[n] = round(elapsed, 3)

    @property
    def alive(self) -> bool:
        return self._thread.alive

    async def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        """Run ``images`` as one batch on the inference thread, split the result."""
        self.ensure_running()
        try:
            probs, elapsed = await asyncio.wrap_future(self._thread.submit(images))
        except NotReady:
            raise
        except Exception as exc:
            logger.exception("inference failed for a batch of %d", len(images))
            raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc
        n = len(images)
        return [Prediction(probs=probs[i], inference_ms=elapsed, batch_size=n) for i in range(n)]

    def close(self, timeout: float | None = None) -> None:
        self._closed = True
        self._thread.close(timeout)
