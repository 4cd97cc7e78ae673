"""What routes receive by dependency: the service, and the query parameters every prediction
route shares.

Every dependency here is an ``async def`` that does no I/O. FastAPI sends a plain function or
a class to a worker thread, so each would cost every request a thread hop (and the first one
anyio's thread pool) for a few microseconds of work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from resnet_serve.explain import MAX_EXPLAINED
from resnet_serve.labels import Language
from resnet_serve.service import Service
from resnet_serve.settings import DEFAULT_TOP_K, MAX_TOP_K


async def get_service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


MODEL = Query(None, description="a model the server serves (GET /models); default: the default model")
LANG = Query("en", description="language of `label`: en or zh")


@dataclass(frozen=True)
class ModelQuery:
    """``model``: which of the served models a route is about."""

    model: str | None


@dataclass(frozen=True)
class PredictQuery(ModelQuery):
    """``model``, ``top_k`` and ``lang``, validated once for every prediction route."""

    top_k: int
    lang: Language


@dataclass(frozen=True)
class ExplainQuery(ModelQuery):
    """``model``, ``top_k`` (classes explained), ``class_id`` (explain this one instead), ``lang``."""

    top_k: int
    class_id: int | None
    lang: Language


async def model_query(model: str | None = MODEL) -> ModelQuery:
    return ModelQuery(model)


async def predict_query(
    model: str | None = MODEL,
    top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="how many classes"),
    lang: Language = LANG,
) -> PredictQuery:
    return PredictQuery(model, top_k, lang)


async def explain_query(
    model: str | None = MODEL,
    top_k: int = Query(1, ge=1, le=MAX_EXPLAINED, description="explain the k most likely classes"),
    class_id: int | None = Query(None, ge=0, description="explain this class instead (its index)"),
    lang: Language = LANG,
) -> ExplainQuery:
    return ExplainQuery(model, top_k, class_id, lang)


ServiceDep = Annotated[Service, Depends(get_service)]
ModelQueryDep = Annotated[ModelQuery, Depends(model_query)]
PredictQueryDep = Annotated[PredictQuery, Depends(predict_query)]
ExplainQueryDep = Annotated[ExplainQuery, Depends(explain_query)]
