"""What routes receive by dependency: the service, and the query parameters every prediction
route shares."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from resnet_serve.explain import MAX_EXPLAINED
from resnet_serve.labels import Language
from resnet_serve.service import Service
from resnet_serve.settings import DEFAULT_TOP_K, MAX_TOP_K


def get_service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


MODEL = Query(None, description="a model the server serves (GET /models); default: the default model")


class ModelQuery:
    """``model``: which of the served models a route is about."""

    def __init__(self, model: str | None = MODEL) -> None:
        self.model = model


class PredictQuery(ModelQuery):
    """``model``, ``top_k`` and ``lang``, validated once for every prediction route."""

    def __init__(
        self,
        model: str | None = MODEL,
        top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="how many classes"),
        lang: Language = Query("en", description="language of `label`: en or zh"),
    ) -> None:
        super().__init__(model)
        self.top_k = top_k
        self.lang = lang


class ExplainQuery(ModelQuery):
    """``model``, ``top_k`` (classes explained), ``class_id`` (explain this one instead), ``lang``."""

    def __init__(
        self,
        model: str | None = MODEL,
        top_k: int = Query(1, ge=1, le=MAX_EXPLAINED, description="explain the k most likely classes"),
        class_id: int | None = Query(None, ge=0, description="explain this class instead (its index)"),
        lang: Language = Query("en", description="language of `label`: en or zh"),
    ) -> None:
        super().__init__(model)
        self.top_k = top_k
        self.class_id = class_id
        self.lang = lang


ServiceDep = Annotated[Service, Depends(get_service)]
ModelQueryDep = Annotated[ModelQuery, Depends()]
PredictQueryDep = Annotated[PredictQuery, Depends()]
ExplainQueryDep = Annotated[ExplainQuery, Depends()]
