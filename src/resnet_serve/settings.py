"""Every knob of the service, read once from ``RESNET_SERVE_*`` environment variables.

A ``Settings`` object is built at the edge (the CLI or ``create_app``) and passed down;
no module reads the environment on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PrecisionName = Literal["auto", "fp32", "fp16", "bf16"]
WeightsMode = Literal["auto", "official", "random"]
DispatchPolicy = Literal["eager", "wait"]

MAX_TOP_K = 20
DEFAULT_TOP_K = 3


class Settings(BaseSettings):
    """Service configuration; each field maps to ``RESNET_SERVE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="RESNET_SERVE_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with its own model")

    device: DeviceName = "auto"
    precision: PrecisionName = Field("auto", description="auto: fp16 on CUDA, fp32 elsewhere")
    torch_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    weights: Path | None = Field(None, description="explicit path to a ResNet-18 state_dict file")
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

    max_upload_mb: float = Field(10.0, gt=0)
    max_pixels: int = Field(50_000_000, ge=1)
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def queue_limit(self) -> int:
        """Queued requests admitted before answering 503.

        By default 16 batches' worth: enough to keep the model busy through a burst, small
        enough that an admitted request still finishes well inside its deadline on CPU.
        """
        return self.max_queue if self.max_queue is not None else 16 * self.max_batch_size
