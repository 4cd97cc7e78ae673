"""ONNX Runtime as a backend: the slim server's runtime, on the CPU, FP32 or INT8 (static QDQ).

The graph is the serving graph the TorchScript backend runs (exported by
``backends.torch.onnx_export``, quantized by ``backends.torch.export``): ``uint8`` NCHW pixels
in, float32 probabilities out, with a dynamic batch dimension. Session settings for serving:
its own intra-op threads (``RESNET_SERVE_ORT_THREADS``), one inter-op thread (batches run one at
a time on the inference thread anyway), every graph optimisation, the CPU arena on
(``RESNET_SERVE_ORT_ARENA``; measured: with it off, peak RSS under load grew through
fragmentation), and the intra-op threads sleeping rather than spinning between parallel sections
(``RESNET_SERVE_ORT_SPINNING``): under load the cores they would spin on are the ones the decode
threads and the event loop need (``benchmarks/http_bench.py``, docs/performance.md). Memory patterns stay
on, ONNX Runtime's default: serving every batch size with them on or off left the same RSS and
peak, and no slower (``benchmarks/ort_session_bench.py``). The optimised graph is kept next to
the compiled-model cache, keyed by the artefact, ONNX Runtime's version and the CPU (its model
and flags: the layouts are specific to the instruction set), so a restart skips the optimisation.

The kept graph is a folder: the graph, and its weights in a file of their own, which ONNX Runtime
maps into memory instead of parsing them out of the graph and copying them (opening ResNet-18
FP32: 10 ms against 145; the pages are the page cache's, shared by every worker). A mapped file
must never be rewritten under a running server, so a graph is written into a fresh folder and
moved into place with one rename: another server finds the whole folder or none, and a damaged
one is renamed away, never truncated.

INT8 on CPUs with AMX: ONNX Runtime runs a convolution whose weights are symmetric (zero point 0,
a constant) through its symmetric convolution kernels, which go up to AVX-512 VNNI and have none
for AMX; any other convolution goes through its general INT8 GEMM, which has. Export writes a
patch with each INT8 graph (``Artefact.ort_gemm_patch``, a ModelProto fragment that protobuf
merges into the graph when appended) declaring the weight zero points of the large convolutions
as graph inputs, so they are no longer constants; where this process can use AMX
(``amx_usable``) the backend appends it, and those convolutions run the GEMM. Same weights, same
zero points, same results; ``benchmarks/ort_int8_bench.py`` measures the gain there and the loss
on a CPU without AMX. A patch that does not apply is reported, and the graph served as exported.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

from resnet_serve.backends import GRAPH_FEATURES, GRAPH_INPUT, GRAPH_OUTPUT, ONNXRUNTIME, Explained, amx_usable

logger = logging.getLogger(__name__)

RUNTIME_VERSION: str = onnxruntime.__version__  # keys the optimised graph (importlib.metadata costs ~50 ms at start)
KEPT_GRAPH = "model.onnx"  # in the kept folder, beside its weights:
KEPT_WEIGHTS = "model.onnx.data"
STALE_SCRATCH_S = 600.0  # optimising a ResNet-18 takes seconds; a scratch folder this old is abandoned


def _options(threads: int, arena: bool, optimise: bool, spinning: bool = False,
             patched: bool = False) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    if patched:  # ONNX Runtime warns of each zero point the patch declares as an input: meant so
        options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = (onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                        else onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return options


def _staging(optimised: Path, options: onnxruntime.SessionOptions) -> Path | None:
    """A fresh folder beside ``optimised`` for ONNX Runtime to write the optimised graph into,
    its weights in a file of their own (None, with a warning, where none can be made). Scratch
    folders older than ``STALE_SCRATCH_S`` are left from a server stopped mid-write: removed."""
    for scratch in optimised.parent.glob(f".{optimised.name}.*"):
        with contextlib.suppress(OSError):
            if time.time() - scratch.stat().st_mtime > STALE_SCRATCH_S:
                shutil.rmtree(scratch)
    try:
        optimised.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{optimised.name}.", dir=optimised.parent))
    except OSError as exc:
        logger.warning("cannot keep the optimised graph in %s: %s", optimised.parent, exc)
        return None
    options.optimized_model_filepath = str(staging / KEPT_GRAPH)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", KEPT_WEIGHTS)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 3  # its notice that the graph fits this CPU only: known, keyed so
    return staging


def _keep(staging: Path, optimised: Path) -> None:
    """Move the freshly written graph into place with one rename; a copy already there (damaged,
    or just kept by another server) is renamed away first, so no mapped file is ever rewritten."""
    try:
        if optimised.exists():
            replaced = staging.with_name(f"{staging.name}.replaced")
            os.rename(optimised, replaced)
            shutil.rmtree(replaced, ignore_errors=True)
        os.rename(staging, optimised)
    except OSError as exc:  # another server kept its copy meanwhile: it serves as well as this one
        logger.debug("not keeping the optimised graph in %s: %s", optimised, exc)
        shutil.rmtree(staging, ignore_errors=True)


class OnnxRuntimeBackend:
    """An ONNX Runtime session on the CPU."""

    runtime = ONNXRUNTIME
    device = "cpu"
    warmup_rounds = 1
    warmup_every_size = False

    def __init__(self, path: Path, *, threads: int, precision: str = "fp32", arena: bool = True,
                 spinning: bool = False, optimised: Path | None = None, gemm_patch: str | None = None,
                 instances: int = 1) -> None:
        """``optimised``: the folder where the optimised graph is kept between starts (None: not
        kept). ``gemm_patch``: the artefact's, applied where AMX is usable (see the module's notes);
        the kept graph is keyed by it and by the CPU (``loading``), so it is kept patched."""
        self.precision = precision
        self.instances = instances
        threads = max(1, threads // instances)  # each run on the calling thread and threads - 1 of the pool
        patched = bool(gemm_patch) and amx_usable()
        try:
            patch = base64.b64decode(gemm_patch, validate=True) if gemm_patch and patched else None
            self.session = self._session(path, patch, threads, arena, spinning, optimised)
        except Exception as exc:
            if not patched:
                raise
            logger.warning("%s: its GEMM patch does not apply (%s); serving the graph as exported", path.name, exc)
            patched, self.session = False, self._session(path, None, threads, arena, spinning, optimised)
        if patched:
            logger.info("%s: %d INT8 convolutions run ONNX Runtime's INT8 GEMM (this CPU has AMX)", path.name,
                        len(self.session.get_overridable_initializers()))

    @staticmethod
    def _session(path: Path, patch: bytes | None, threads: int, arena: bool, spinning: bool,
                 optimised: Path | None) -> onnxruntime.InferenceSession:
        providers = ["CPUExecutionProvider"]
        if optimised is not None and (optimised / KEPT_GRAPH).is_file():
            try:
                return onnxruntime.InferenceSession(str(optimised / KEPT_GRAPH),
                                                    _options(threads, arena, False, spinning, patch is not None),
                                                    providers=providers)
            except Exception as exc:  # a damaged or stale copy is made again
                logger.warning("ignoring the optimised graph in %s: %s", optimised, exc)
        options = _options(threads, arena, True, spinning, patch is not None)
        staging = _staging(optimised, options) if optimised is not None else None
        try:
            graph = path.read_bytes() + patch if patch is not None else str(path)  # protobuf merges the two
            session = onnxruntime.InferenceSession(graph, options, providers=providers)
        except Exception:
            if staging is not None:  # a graph that does not open leaves no scratch folder behind
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if optimised is not None and staging is not None:
            _keep(staging, optimised)
        return session

    def prepare_thread(self) -> None:
        """ONNX Runtime keeps its own thread pool; nothing to set per thread."""

    def run(self, pixels: np.ndarray) -> np.ndarray:
        (probs,) = self.session.run([GRAPH_OUTPUT], {GRAPH_INPUT: np.ascontiguousarray(pixels)})
        return probs  # type: ignore[no-any-return]


class OnnxCam:
    """CAM without torch, for a model whose head is a global average pool and a linear layer: the
    ONNX graph outputs the last block's activations ``A`` beside the probabilities, and the map of
    class ``c`` is ``relu(W[c] · A)``, which is exactly what Grad-CAM gives for such a head. Its own
    session with one thread, on the explainer's thread (never the inference thread's session)."""

    def __init__(self, graph: Path, head: Path) -> None:
        options = _options(1, arena=False, optimise=True)
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        if GRAPH_FEATURES not in {o.name for o in self.session.get_outputs()}:
            raise ValueError(f"{graph.name} has no {GRAPH_FEATURES!r} output (exported before CAM); export it again")
        with np.load(head) as data:
            self.layer, self.weight = str(data["layer"]), data["weight"].astype(np.float32)

    def __call__(self, pixels: np.ndarray, classes: list[int] | None = None, top_k: int = 1) -> Explained:
        probs, features = self.session.run([GRAPH_OUTPUT, GRAPH_FEATURES],
                                           {GRAPH_INPUT: np.ascontiguousarray(pixels[np.newaxis])})
        probs, activations = probs[0], features[0]
        wanted = classes if classes is not None else [int(c) for c in np.argsort(-probs, kind="stable")[:top_k]]
        k, h, w = activations.shape
        maps = np.maximum(self.weight[wanted] @ activations.reshape(k, h * w), 0.0).reshape(len(wanted), h, w)
        peaks = maps.reshape(len(wanted), -1).max(axis=1)
        grids = {c: (m / p if p > 0 else m).astype(np.float32) for c, m, p in zip(wanted, maps, peaks)}
        return Explained(probs, grids, self.layer, "cam")
