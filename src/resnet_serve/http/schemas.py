"""The JSON the API speaks, as pydantic models (so ``/docs`` documents every field).

No torch and no server code: the client imports these too.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from resnet_serve.labels import Labels, Language
from resnet_serve.results import ImageResult, top_k


class ClassScore(BaseModel):
    rank: int = Field(description="1 for the most likely class")
    class_id: int = Field(description="class index (ImageNet-1k: 0-999)")
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
    model_version: int = Field(1, description="the version of the model that answered")
    weights: str = Field(description="official, custom or random-init (predictions meaningless)")

    @classmethod
    def build(cls, result: ImageResult, labels: Labels, *, model: str, version: int, weights: str,
              filename: str | None, start: float, top_k: int, lang: Language) -> PredictResponse:
        """The answer for one image, timed from ``start`` (monotonic)."""
        return cls(
            predictions=class_scores(labels, result, top_k, lang),
            image=ImageInfo(format=result.format, width=result.width, height=result.height, filename=filename),
            preprocess_time_ms=round(result.preprocess_ms, 3),
            queue_time_ms=round(result.queue_ms, 3),
            inference_time_ms=round(result.inference_ms, 3),
            total_time_ms=round((time.monotonic() - start) * 1000.0, 3),
            batch_size=result.batch_size,
            cached=result.cached,
            model=model,
            model_version=version,
            weights=weights,
        )


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
    status: str = Field(description="alive, ready, loading, failed, restarting or shutting_down")
    weights: str | None = None
    runtime: str | None = Field(None, description="torchscript, onnxruntime or openvino, once the model is loaded")
    detail: str | None = None


class ModelResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: int
    architecture: str
    default: bool = Field(description="the model /predict serves without ?model=")
    weights: str
    weights_sha256: str | None
    weights_path: str | None
    runtime: str = Field(description="torchscript, onnxruntime or openvino")
    runtime_reason: str = Field(description="why this runtime: configured, the only one, or timed on this machine")
    platform: str = Field(description="the runtime as Triton names it: pytorch_torchscript, onnxruntime_onnx or openvino")
    device: str
    precision: str
    channels_last: bool
    compiled_from: str = Field(description="exported by this start (the default model), or loaded from the repository")
    start_s: float = Field(description="seconds to compile (or load) and warm up the model")
    cache_size: int = Field(description="result cache entries (0: off)")
    threads: int = Field(description="intra-op threads of the runtime, divided among its instances")
    instances: int = Field(1, description="batches the model runs at once, each on an inference thread of its own")
    max_batch_size: int
    max_wait_ms: float
    dispatch: str
    max_queue: int
    request_timeout_s: float
    max_upload_mb: float
    num_classes: int
    input_size: int
    warmup_batch_ms: dict[int, float] = Field(description="forward time per batch size at start-up")
    torch_version: str | None = Field(description="installed torch (null: not installed)")
    onnxruntime_version: str | None = Field(description="installed ONNX Runtime (null: not installed)")
    openvino_version: str | None = Field(None, description="installed OpenVINO (null: not installed)")


class ModelSummary(BaseModel):
    """One model of the repository, as ``GET /models`` lists it."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: int
    state: str = Field(description="READY, LOADING or UNAVAILABLE (Triton's names)")
    reason: str | None = Field(None, description="why it is unavailable")
    default: bool
    architecture: str | None = None
    num_classes: int | None = None
    runtime: str | None = None
    precision: str | None = None
    weights: str | None = None


class ModelsResponse(BaseModel):
    default: str | None
    models: list[ModelSummary]


class LabelEntry(BaseModel):
    class_id: int
    en: str
    zh: str


class LabelsResponse(BaseModel):
    count: int
    labels: list[LabelEntry]


def class_scores(labels: Labels, result: ImageResult, k: int, lang: Language) -> list[ClassScore]:
    """The ``k`` most likely classes of one image, ranked, named in both languages."""
    values, indices = top_k(result.probs, k)
    return [
        ClassScore(
            rank=rank,
            class_id=class_id,
            label=labels.name(class_id, lang),
            label_en=labels.en[class_id],
            label_zh=labels.zh[class_id],
            confidence=confidence,
        )
        for rank, (confidence, class_id) in enumerate(zip(values, indices), start=1)
    ]


class ExplainedClass(BaseModel):
    class_id: int
    label: str = Field(description="the class name in the requested language")
    label_en: str
    label_zh: str
    confidence: float = Field(ge=0.0, le=1.0, description="softmax probability")
    heatmap_png: str = Field(description="base64 PNG (RGBA) of the image's own width x height: the map coloured "
                                         "blue (cold) to red (hot) over the model's crop, transparent outside it")
    grid: list[list[float]] = Field(description="the map at the layer's resolution over the crop, rows top "
                                                "to bottom, in [0, 1]")


class ExplainResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    predictions: list[ClassScore] = Field(description="the top_k classes, as /predict ranks them")
    explanations: list[ExplainedClass] = Field(description="one per explained class")
    image: ImageInfo
    method: str = Field("grad-cam", description="grad-cam: Grad-CAM on an eager FP32 copy of the served network "
                                                "(torch); cam: CAM from the ONNX graph, exact for a global-pool + "
                                                "linear head (the torch-free install)")
    layer: str = Field(description="the module explained, e.g. layer4")
    crop_box: tuple[float, float, float, float] = Field(
        description="where the model's crop lies in the image: left, top, right, bottom (pixels)")
    explain_time_ms: float = Field(description="Grad-CAM itself: one forward and one backward pass per class")
    total_time_ms: float = Field(description="server time from request to response, queue and drawing included")
    model: str
    model_version: int
    weights: str = Field(description="official, custom or random-init (explanations meaningless)")
