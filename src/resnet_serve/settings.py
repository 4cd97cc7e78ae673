"""Every knob of the service, read once from ``RESNET_SERVE_*`` environment variables.

A ``Settings`` object is built at the edge (the CLI or ``create_app``) and passed down;
no module reads the environment on its own.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PrecisionName = Literal["auto", "fp32", "fp16", "bf16", "int8"]
Int8Backend = Literal["fbgemm", "onednn", "x86"]
WeightsMode = Literal["auto", "official", "random"]
DispatchPolicy = Literal["eager", "wait"]
ModelControl = Literal["none", "explicit"]
LogFormat = Literal["plain", "json"]
RuntimeName = Literal["auto", "torchscript", "onnxruntime", "openvino"]

MAX_TOP_K = 20
DEFAULT_TOP_K = 3
ENV_PREFIX = "RESNET_SERVE_"
NOT_SETTINGS = ("RESNET_SERVE_BENCH_",)  # read by the benchmarks, not by the service


def _cores() -> int:
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Service configuration; each field maps to ``RESNET_SERVE_<FIELD>``."""

    # An empty variable is an unset one (compose files pass ${VAR:-} through): the default, not
    # the current folder for a path or an error for a number.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with its own model")

    model_repository: Path | None = Field(
        None, description="serve every model of this repository; unset: the built-in ResNet-18, exported on first start"
    )
    default_model: str | None = Field(
        None, description="the model /predict serves without ?model= (unset: resnet18 if served, else the first)"
    )
    model_control: ModelControl = Field(
        "none", description="explicit: POST /v2/repository/models/NAME/load and /unload serve a model's latest "
        "version, or stop serving it, with no restart (Triton's explicit model control); one worker only"
    )

    device: DeviceName = "auto"
    precision: PrecisionName = Field("auto", description="auto: fp16 on CUDA, fp32 elsewhere; bf16 on the CPU: "
                                     "TorchScript, or OpenVINO running the FP32 ONNX graph in BF16")
    runtime: RuntimeName = Field(
        "auto", description="auto: the faster installed CPU runtime, timed once per machine; TorchScript on a GPU"
    )
    instances: int = Field(1, ge=1, le=64, description="batches a model runs at once, each on an inference thread "
                           "of its own, the runtime's threads divided among them")
    torch_threads: int = Field(default_factory=_cores, ge=1, description="torch intra-op threads")
    ort_threads: int = Field(default_factory=_cores, ge=1, description="ONNX Runtime intra-op threads")
    ort_arena: bool = Field(True, description="ONNX Runtime's CPU memory arena (off: lower idle RSS, more fragmentation)")
    ort_spinning: bool = Field(False, description="ONNX Runtime's intra-op threads spin between parallel sections "
                               "(off: they sleep, leaving the cores to decoding and HTTP under load)")
    openvino_threads: int = Field(default_factory=_cores, ge=1, description="OpenVINO inference threads")
    channels_last: bool = Field(True, description="NHWC memory layout on CPU and CUDA")
    int8_backend: Int8Backend = "x86"
    calibration_dir: Path | None = Field(None, description="photos for INT8 calibration")
    compiled_cache: bool = Field(True, description="keep the default model's repository on disk between starts")
    compiled_cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "resnet-serve")
    cache_size: int = Field(1024, ge=0, description="LRU result cache entries; 0 turns it off")

    weights: Path | None = Field(None, description="explicit path to the model's state_dict file")
    weights_dir: Path = Path("weights")
    weights_mode: WeightsMode = Field(
        "auto", description="auto: fall back to a random init loudly; official: refuse to start"
    )
    allow_download: bool = Field(True, description="try torchvision's download if no file is found")

    max_batch_size: int = Field(4, ge=1, le=1024)
    max_wait_ms: float = Field(50.0, ge=0)
    dispatch: DispatchPolicy = "eager"
    max_queue: int | None = Field(
        None, ge=1, description="queued requests before 503; default derived from batch size"
    )
    request_timeout_s: float = Field(5.0, gt=0)

    explain_queue: int = Field(4, ge=1, description="explanations waiting or running before 503 (one runs at a time)")
    explain_priority: Literal["idle", "low", "normal"] = Field(
        "idle", description="CPU priority of explanations: idle (SCHED_IDLE), low (nice 19), normal")
    explain_max_pixels: int = Field(16_000_000, ge=1, description="largest image /explain takes (its heatmap is that size)")

    shutdown_grace_s: float = Field(10.0, ge=0, description="time queued requests get on SIGTERM")

    max_upload_mb: float = Field(10.0, gt=0)
    max_pixels: int = Field(50_000_000, ge=1)
    decode_threads: int = Field(default_factory=_cores, ge=1)

    api_key: SecretStr | None = Field(None, description="if set, /predict needs it (Bearer or X-API-Key)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS; empty: CORS off"
    )
    log_format: LogFormat = "plain"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _one_worker_for_model_control(self) -> Settings:
        if self.model_control == "explicit" and self.workers > 1:
            raise ValueError("RESNET_SERVE_MODEL_CONTROL=explicit needs one worker: a load or unload would "
                             "reach only the worker that answers it")
        return self

    @field_validator("port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value: object) -> object:
        if isinstance(value, str) and value.startswith("tcp://"):
            raise ValueError("this is Kubernetes' service link for a Service named resnet-serve, not a port: set "
                             "enableServiceLinks: false in the pod spec (as deploy/k8s does), or RESNET_SERVE_PORT "
                             "in its env")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def queue_limit(self, batch_ms: float | None = None, instances: int = 1) -> int:
        """Queued requests admitted before answering 503.

        By default, as many as the model can finish in half the request deadline, given the
        time of a full batch (``batch_ms``, from warm-up: ``ModelInfo.batch_ms``, which scales
        a smaller batch up where only that was warmed) and the ``instances`` that run batches
        at once (each timed on its own share of the threads): a request admitted later
        would likely time out anyway, so refusing it at once is kinder. Without a measurement,
        16 full batches. Never fewer than one batch.
        """
        if self.max_queue is not None:
            return self.max_queue
        if not batch_ms:
            return 16 * self.max_batch_size
        batches = instances * (self.request_timeout_s * 1000.0 / 2) / batch_ms
        return max(self.max_batch_size, min(4096, int(batches * self.max_batch_size)))


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """A line for each ``RESNET_SERVE_*`` variable that sets nothing, with the setting it most
    resembles: a misspelt variable is otherwise ignored without a word."""
    fields = list(Settings.model_fields)
    lines = []
    for name in sorted(environ):
        field = name[len(ENV_PREFIX):].lower()
        if name.startswith(ENV_PREFIX) and field not in fields and not name.startswith(NOT_SETTINGS):
            close = difflib.get_close_matches(field, fields, n=1, cutoff=0.6)
            lines.append(f"{name} is not a setting and is ignored"
                         + (f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""))
    return lines
