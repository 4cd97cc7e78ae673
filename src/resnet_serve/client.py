"""A small typed client for resnet-serve, sync and async, on httpx.

    from resnet_serve.client import Client
    with Client("http://127.0.0.1:8000") as client:
        answer = client.predict("cat.jpg", top_k=5, lang="zh")
        print(answer.predictions[0].label, answer.predictions[0].confidence)

Errors from the service raise ``ClientError`` with its status, code and message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from resnet_serve.http.schemas import (
    BatchResponse,
    ExplainResponse,
    LabelsResponse,
    ModelResponse,
    ModelsResponse,
    PredictResponse,
)

Image = bytes | str | Path


class ClientError(Exception):
    """A non-2xx answer, with the service's error code and message (and ``Retry-After``)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def retry_delay(error: ClientError, attempt: int) -> float | None:
    """How long to wait before trying again (None: do not): only a 503 (overloaded, warming up)
    is worth retrying; its ``Retry-After``, else an exponential backoff from 0.25 s, capped."""
    if error.status != 503:
        return None
    return error.retry_after if error.retry_after is not None else min(8.0, 0.25 * 2**attempt)


def _image(image: Image, filename: str | None) -> tuple[str, bytes, str]:
    if isinstance(image, bytes):
        return (filename or "image", image, "application/octet-stream")
    path = Path(image)
    return (filename or path.name, path.read_bytes(), "application/octet-stream")


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        error = response.json()["error"]
        code, message = (error["code"], error["message"]) if isinstance(error, dict) else ("error", str(error))
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    retry_after = response.headers.get("retry-after", "")
    raise ClientError(response.status_code, code, message,
                      float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None)


def _params(model: str | None, **others: object) -> dict[str, object]:
    return {**others, "model": model} if model else others


def _explain_params(top_k: int, class_id: int | None, lang: str, model: str | None) -> dict[str, object]:
    return _params(model, top_k=top_k, lang=lang, **({"class_id": class_id} if class_id is not None else {}))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Blocking client."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 30.0, **httpx_options: Any) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=_headers(api_key), **httpx_options)

    def predict(self, image: Image, *, top_k: int = 3, lang: str = "en", filename: str | None = None,
                model: str | None = None) -> PredictResponse:
        response = self._http.post("/predict", params=_params(model, top_k=top_k, lang=lang),
                                   files={"file": _image(image, filename)})
        return PredictResponse.model_validate(_checked(response).json())

    def predict_batch(self, images: Sequence[Image], *, top_k: int = 3, lang: str = "en",
                      model: str | None = None) -> BatchResponse:
        files = [("files", _image(image, None)) for image in images]
        response = self._http.post("/predict/batch", params=_params(model, top_k=top_k, lang=lang), files=files)
        return BatchResponse.model_validate(_checked(response).json())

    def explain(self, image: Image, *, top_k: int = 1, class_id: int | None = None, lang: str = "en",
                model: str | None = None) -> ExplainResponse:
        """Grad-CAM heatmaps (base64 PNGs of the image's size) for the top classes or ``class_id``."""
        response = self._http.post("/explain", params=_explain_params(top_k, class_id, lang, model),
                                   files={"file": _image(image, None)})
        return ExplainResponse.model_validate(_checked(response).json())

    def ready(self) -> bool:
        return self._http.get("/health/ready").status_code == 200

    def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate(_checked(self._http.get("/models")).json())

    def model(self, name: str | None = None) -> ModelResponse:
        return ModelResponse.model_validate(_checked(self._http.get("/model", params=_params(name))).json())

    def labels(self, model: str | None = None) -> LabelsResponse:
        return LabelsResponse.model_validate(_checked(self._http.get("/labels", params=_params(model))).json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same, for asyncio; ``retries``: how often a call retries a 503 (``retry_delay``)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 30.0, retries: int = 0, **httpx_options: Any) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=_headers(api_key), **httpx_options)
        self.retries = retries

    async def _answer(self, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        """``send``'s answer, sent again after a 503 (a server warming up or full) up to ``retries`` times."""
        attempt = 0
        while True:
            try:
                return _checked(await send())
            except ClientError as error:
                delay = retry_delay(error, attempt)
                if delay is None or attempt >= self.retries:
                    raise
            attempt += 1
            await asyncio.sleep(delay)

    async def predict(self, image: Image, *, top_k: int = 3, lang: str = "en", filename: str | None = None,
                      model: str | None = None) -> PredictResponse:
        files = {"file": _image(image, filename)}
        response = await self._answer(lambda: self._http.post(
            "/predict", params=_params(model, top_k=top_k, lang=lang), files=files))
        return PredictResponse.model_validate(response.json())

    async def predict_batch(self, images: Sequence[Image], *, top_k: int = 3, lang: str = "en",
                            model: str | None = None) -> BatchResponse:
        files = [("files", _image(image, None)) for image in images]
        response = await self._answer(lambda: self._http.post(
            "/predict/batch", params=_params(model, top_k=top_k, lang=lang), files=files))
        return BatchResponse.model_validate(response.json())

    async def explain(self, image: Image, *, top_k: int = 1, class_id: int | None = None, lang: str = "en",
                      model: str | None = None) -> ExplainResponse:
        files = {"file": _image(image, None)}
        response = await self._answer(lambda: self._http.post(
            "/explain", params=_explain_params(top_k, class_id, lang, model), files=files))
        return ExplainResponse.model_validate(response.json())

    async def ready(self) -> bool:
        return (await self._http.get("/health/ready")).status_code == 200

    async def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate((await self._answer(lambda: self._http.get("/models"))).json())

    async def model(self, name: str | None = None) -> ModelResponse:
        response = await self._answer(lambda: self._http.get("/model", params=_params(name)))
        return ModelResponse.model_validate(response.json())

    async def labels(self, model: str | None = None) -> LabelsResponse:
        response = await self._answer(lambda: self._http.get("/labels", params=_params(model)))
        return LabelsResponse.model_validate(response.json())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
