"""The JSON the API speaks, as pydantic models (so ``/docs`` documents every field)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from resnet_serve.labels import Labels, Language


class ClassScore(BaseModel):
    rank: int = Field(description="1 for the most likely class")
    class_id: int = Field(description="ImageNet-1k class index, 0-999")
    label: str = Field(description="the class name in the requested language")
    label_en: str
    label_zh: str
    confidence: float = Field(ge=0.0, le=1.0, description="softmax probability")


class ImageInfo(BaseModel):
    format: str = Field(description="format detected from the bytes, e.g. JPEG")
    width: int
    height: int
    filename: str | None = Field(None, description="as sent by the client; never used otherwise")


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "predictions": [
                        {"rank": 1, "class_id": 281, "label": "tabby", "label_en": "tabby",
                         "label_zh": "虎斑猫", "confidence": 0.62},
                        {"rank": 2, "class_id": 282, "label": "tiger cat", "label_en": "tiger cat",
                         "label_zh": "虎猫", "confidence": 0.21},
                        {"rank": 3, "class_id": 285, "label": "Egyptian cat",
                         "label_en": "Egyptian cat", "label_zh": "埃及猫", "confidence": 0.09},
                    ],
                    "image": {"format": "JPEG", "width": 451, "height": 300, "filename": "cat.jpg"},
                    "preprocess_time_ms": 2.1,
                    "queue_time_ms": 0.1,
                    "inference_time_ms": 24.8,
                    "total_time_ms": 27.9,
                    "batch_size": 1,
                    "cached": False,
                    "model": "resnet18",
                    "weights": "official",
                }
            ]
        },
    )

    predictions: list[ClassScore]
    image: ImageInfo
    preprocess_time_ms: float = Field(description="decode, resize and crop")
    queue_time_ms: float = Field(description="waiting for a batch to be dispatched")
    inference_time_ms: float = Field(description="the model's forward pass for the whole batch")
    total_time_ms: float = Field(description="server time from request to response")
    batch_size: int = Field(description="how many requests shared the forward pass (0 if cached)")
    cached: bool = Field(False, description="answered from the result cache (same bytes seen before)")
    model: str
    weights: str = Field(description="official, custom or random-init (predictions meaningless)")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. payload_too_large")
    message: str = Field(description="what went wrong, for a person")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchItem(BaseModel):
    index: int = Field(description="position of the file in the request")
    filename: str | None
    status: int = Field(description="the HTTP status this file alone would have had")
    result: PredictResponse | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]
    total_time_ms: float


class HealthResponse(BaseModel):
    status: str = Field(description="alive, ready, loading, failed or shutting_down")
    weights: str | None = None
    detail: str | None = None


class ModelResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    weights: str
    weights_sha256: str | None
    weights_path: str | None
    device: str
    precision: str
    channels_last: bool
    compiled_from: str = Field(description="compiled at start-up, or loaded from the on-disk cache")
    start_s: float = Field(description="seconds to compile (or load) and warm up the model")
    cache_size: int = Field(description="result cache entries (0: off)")
    torch_threads: int
    max_batch_size: int
    max_wait_ms: float
    dispatch: str
    max_queue: int
    request_timeout_s: float
    max_upload_mb: float
    num_classes: int
    input_size: int
    warmup_batch_ms: dict[int, float] = Field(description="forward time per batch size at start-up")
    torch_version: str
    torchvision_version: str


class LabelEntry(BaseModel):
    class_id: int
    en: str
    zh: str


class LabelsResponse(BaseModel):
    count: int
    labels: list[LabelEntry]


def class_scores(labels: Labels, probs: torch.Tensor, top_k: int, lang: Language) -> list[ClassScore]:
    """The ``top_k`` classes of one probability vector, ranked, named in both languages."""
    values, indices = torch.topk(probs, top_k)
    return [
        ClassScore(
            rank=rank,
            class_id=class_id,
            label=labels.name(class_id, lang),
            label_en=labels.en[class_id],
            label_zh=labels.zh[class_id],
            confidence=confidence,
        )
        for rank, (confidence, class_id) in enumerate(zip(values.tolist(), indices.tolist()), start=1)
    ]
