"""The typed client, sync and async, against the real app."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from resnet_serve.client import AsyncClient, Client, ClientError
from resnet_serve.http.app import create_app
from resnet_serve.inference import Engine
from resnet_serve.settings import Settings
from tests.conftest import open_client


async def test_the_async_client(settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes], tmp_path: Path) -> None:
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(photo_jpegs["chelsea"])
    async for raw in open_client(create_app(settings, engine=engine)):
        client = AsyncClient("http://test", transport=raw._transport)
        answer = await client.predict(photo, top_k=4, lang="zh")
        assert len(answer.predictions) == 4 and answer.image.filename == "cat.jpg"
        assert answer.predictions[0].label == answer.predictions[0].label_zh
        batch = await client.predict_batch([photo_jpegs["rocket"], b"nope"])
        assert [item.status for item in batch.results] == [200, 415]
        assert await client.ready() and (await client.model()).name == "resnet18"
        assert (await client.labels()).count == 1000
        why = await client.explain(photo, top_k=2, lang="zh")
        assert len(why.explanations) == 2 and why.explanations[0].label == why.explanations[0].label_zh
        with pytest.raises(ClientError) as error:
            await client.predict(b"not an image")
        assert (error.value.status, error.value.code) == (415, "unsupported_media_type")
        await client.aclose()


def test_the_sync_client_and_the_api_key(settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]) -> None:
    from pydantic import SecretStr
    from starlette.testclient import TestClient

    locked = settings.model_copy(update={"api_key": SecretStr("k3y")})
    with TestClient(create_app(locked, engine=engine)) as app_client:
        transport = httpx.MockTransport(lambda request: app_client.request(
            request.method, str(request.url), headers=dict(request.headers), content=request.read()))
        with Client("http://testserver", api_key="k3y", transport=transport) as client:
            assert client.predict(photo_jpegs["coffee"]).predictions
            why = client.explain(photo_jpegs["chelsea"], class_id=7)
            assert [e.class_id for e in why.explanations] == [7] and (why.image.width, why.image.height) == (451, 300)
        with Client("http://testserver", transport=transport) as anonymous:
            with pytest.raises(ClientError) as error:
                anonymous.predict(photo_jpegs["coffee"])
            assert error.value.status == 401
            with pytest.raises(ClientError) as error:
                anonymous.explain(photo_jpegs["coffee"])
            assert error.value.status == 401  # explanations sit behind the same API key
