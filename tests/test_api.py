"""End to end through the HTTP API with the real TorchScript ResNet-18."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from PIL import Image, ImageOps

from resnet_serve.http.app import create_app, routers
from resnet_serve.inference import Engine, Prediction
from resnet_serve.settings import Settings
from resnet_serve.spec import RESNET18
from tests.conftest import as_jpeg, encode, open_client, probs_of, until_ready


def upload(data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg") -> dict[str, Any]:
    return {"files": {"file": (name, data, ctype)}}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]


class WrappedEngine:
    """The real engine with a delay and/or injected failures in front of it."""

    def __init__(self, engine: Engine, delay: float = 0.0, failures: int = 0) -> None:
        self.inner, self.delay, self.failures = engine, delay, failures
        self.info = engine.info
        self.batch_sizes: list[int] = []

    def ensure_running(self) -> bool:
        return self.inner.ensure_running()

    def close(self, timeout: float | None = None) -> None:
        """The shared engine outlives the apps that borrow it."""

    async def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        self.batch_sizes.append(len(images))
        await asyncio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected fault")
        return await self.inner.predict(images)


async def client_for(settings: Settings, engine: object) -> AsyncIterator[httpx.AsyncClient]:
    async for c in open_client(create_app(settings, engine=engine)):  # type: ignore[arg-type]
        yield c


async def test_predict_a_real_photo(client: httpx.AsyncClient, photo_jpegs: dict[str, bytes], engine: Engine) -> None:
    data = photo_jpegs["chelsea"]
    response = await client.post("/predict", **upload(data, "cat.jpg"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["X-Model-Weights"] == body["weights"] == "custom"
    assert body["model"] == "resnet18" and body["batch_size"] == 1
    assert body["image"] == {"format": "JPEG", "width": 451, "height": 300, "filename": "cat.jpg"}
    for key in ("preprocess_time_ms", "queue_time_ms", "inference_time_ms", "total_time_ms"):
        assert body[key] >= 0
    assert body["total_time_ms"] >= body["inference_time_ms"]
    predictions = body["predictions"]
    assert [p["rank"] for p in predictions] == [1, 2, 3]
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True)
    # The answer is exactly what the model says for this image in-process.
    expected = (await probs_of(engine, [data]))[0]
    values, indices = expected.topk(3)
    assert [p["class_id"] for p in predictions] == indices.tolist()
    assert confidences == pytest.approx(values.tolist(), abs=1e-6)
    assert predictions[0]["label"] == predictions[0]["label_en"] == RESNET18.categories[indices[0]]


async def test_top_k_and_language(client: httpx.AsyncClient, photo_jpegs: dict[str, bytes]) -> None:
    response = await client.post("/predict?top_k=20&lang=zh", **upload(photo_jpegs["coffee"]))
    predictions = response.json()["predictions"]
    assert len(predictions) == 20
    assert all(p["label"] == p["label_zh"] != p["label_en"] for p in predictions)
    one = await client.post("/predict", params={"top_k": 1}, **upload(photo_jpegs["coffee"]))
    assert len(one.json()["predictions"]) == 1


async def test_the_raw_body_is_accepted_as_well(client: httpx.AsyncClient, photo_jpegs: dict[str, bytes]) -> None:
    for ctype in ("image/jpeg", "application/octet-stream"):
        response = await client.post("/predict", content=photo_jpegs["rocket"], headers={"content-type": ctype})
        assert response.status_code == 200 and response.json()["image"]["filename"] is None


async def test_32_concurrent_requests_each_get_their_own_answer(
    client: httpx.AsyncClient, photos: dict[str, Image.Image], engine: Engine
) -> None:
    images = []
    for image in photos.values():
        images += [image, ImageOps.mirror(image), ImageOps.flip(image), image.rotate(90, expand=True)]
    uploads = [as_jpeg(image) for image in images[:32]]
    assert len(set(uploads)) == 32
    responses = await asyncio.gather(*(client.post("/predict?top_k=5", **upload(u)) for u in uploads))
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["batch_size"] for r in responses) > 1  # they really were batched
    for data, response in zip(uploads, responses):
        alone = (await probs_of(engine, [data]))[0]
        values, indices = alone.topk(5)
        got = response.json()["predictions"]
        assert [p["class_id"] for p in got] == indices.tolist()
        assert [p["confidence"] for p in got] == pytest.approx(values.tolist(), abs=1e-5)


async def test_health_model_and_labels(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).json()["status"] == "alive"
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "weights": "custom", "runtime": "torchscript", "detail": None}
    model = (await client.get("/model")).json()
    assert model["name"] == "resnet18" and model["device"] == "cpu" and model["precision"] == "fp32"
    assert model["weights"] == "custom" and len(model["weights_sha256"]) == 64
    assert (model["max_batch_size"], model["max_wait_ms"], model["dispatch"]) == (4, 50.0, "eager")
    assert model["torch_version"].startswith("2.14.1")
    labels = (await client.get("/labels")).json()
    assert labels["count"] == 1000 and labels["labels"][281] == {"class_id": 281, "en": "tabby", "zh": "虎斑猫"}


async def test_the_openapi_schema_documents_the_upload(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/predict"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["file"] == {"type": "string", "format": "binary"}
    assert {"200", "400", "413", "415", "422", "503", "504"} <= set(operation["responses"])
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        ({"data": {"other": "x"}, "files": {"notfile": ("a.jpg", b"123", "image/jpeg")}}, 422, "missing_file"),
        ({"files": [("file", ("a.jpg", b"1", "image/jpeg")), ("file", ("b.jpg", b"2", "image/jpeg"))]},
         422, "missing_file"),
        ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 422, "missing_file"),
        (upload(b"", "empty.jpg"), 400, "invalid_image"),
        (upload(b"this is a text file renamed to jpg", "notes.jpg"), 415, "unsupported_media_type"),
        (upload(bytes(range(256)) * 40, "noise.png", "image/png"), 415, "unsupported_media_type"),
        ({"json": {"image": "base64?"}}, 415, "unsupported_media_type"),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed_request"),
    ],
)
async def test_bad_requests_get_clear_json_errors(
    client: httpx.AsyncClient, request_args: dict[str, Any], status: int, code: str
) -> None:
    assert_error(await client.post("/predict", **request_args), status, code)


async def test_truncated_and_corrupt_images_are_400(client: httpx.AsyncClient, photos: dict[str, Image.Image]) -> None:
    jpeg = as_jpeg(photos["astronaut"])
    assert_error(await client.post("/predict", **upload(jpeg[: len(jpeg) // 3])), 400, "invalid_image")
    png = encode(photos["astronaut"], "PNG")
    assert_error(await client.post("/predict", **upload(png[:5000], "a.png", "image/png")), 400, "invalid_image")


@pytest.mark.parametrize("query", ["top_k=0", "top_k=21", "top_k=three", "lang=fr"])
async def test_bad_parameters_are_422(client: httpx.AsyncClient, photo_jpegs: dict[str, bytes], query: str) -> None:
    assert_error(await client.post(f"/predict?{query}", **upload(photo_jpegs["rocket"])), 422, "invalid_parameter")


async def test_an_oversized_upload_is_cut_off_at_the_limit(client: httpx.AsyncClient) -> None:
    sent = 0
    chunk = b"\xff" * 65536

    async def endless() -> AsyncIterator[bytes]:  # no Content-Length: the server must count
        nonlocal sent
        for _ in range(1000):  # 64 MB if read to the end
            sent += len(chunk)
            yield chunk

    response = await client.post("/predict", content=endless(), headers={"content-type": "image/jpeg"})
    assert_error(response, 413, "payload_too_large")
    assert sent <= 10 * 1024 * 1024 + 2 * len(chunk)


async def test_a_declared_oversized_multipart_upload_is_refused(client: httpx.AsyncClient) -> None:
    big = b"\xff\xd8" + bytes(10 * 1024 * 1024 + 1)
    assert_error(await client.post("/predict", **upload(big)), 413, "payload_too_large")


async def test_unknown_routes_use_the_same_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nope"), 404, "not_found")
    assert_error(await client.get("/predict"), 405, "method_not_allowed")


async def test_a_full_queue_answers_503_with_retry_after(settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]) -> None:
    slow = WrappedEngine(engine, delay=1.0)
    tight = settings.model_copy(update={"max_queue": 1, "max_batch_size": 1})
    async for c in client_for(tight, slow):
        responses = await asyncio.gather(*(c.post("/predict", **upload(photo_jpegs["rocket"])) for _ in range(5)))
        statuses = sorted(r.status_code for r in responses)
        # admission holds one running and one queued: both are answered, however the loop interleaves
        assert statuses.count(200) >= 2 and set(statuses) == {200, 503}
        refused = next(r for r in responses if r.status_code == 503)
        assert_error(refused, 503, "overloaded")
        assert refused.headers["Retry-After"] == "1"


async def test_with_two_instances_admission_counts_a_running_batch_for_each(
    settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    """Two instances run two batches at once: a queue of one and batches of one admit three
    images, all answered, and a request of four could never fit (413 names the three)."""
    slow = WrappedEngine(engine, delay=1.0)
    slow.info = dataclasses.replace(engine.info, instances=2)
    tight = settings.model_copy(update={"max_queue": 1, "max_batch_size": 1, "cache_size": 0})
    async for c in client_for(tight, slow):
        responses = await asyncio.gather(*(c.post("/predict", **upload(photo_jpegs["rocket"])) for _ in range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 3 and set(statuses) == {200, 503}, statuses
        assert max(slow.batch_sizes) == 1
        four = await c.post("/predict/batch", **batch_of([photo_jpegs["rocket"]] * 4))
        assert_error(four, 413, "payload_too_large")
        assert "at most 3" in four.json()["error"]["message"]


async def test_a_refused_upload_that_awaits_100_continue_is_never_read(
    settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    """curl sends `Expect: 100-continue` for uploads over 1 MB and waits before sending the body:
    a full server answers 503 without asking for it (and closes the connection, whose promised
    body stays unread); a client that sent no such header has its body drained as before."""
    slow = WrappedEngine(engine, delay=1.0)
    tight = settings.model_copy(update={"max_queue": 1, "max_batch_size": 1, "cache_size": 0})
    async for c in client_for(tight, slow):
        busy = [asyncio.create_task(c.post("/predict", **upload(photo_jpegs[n]))) for n in ("rocket", "coffee")]
        while 'resnet_serve_in_flight{model="resnet18"} 2.0' not in (await c.get("/metrics")).text:
            await asyncio.sleep(0.01)
        pulled = {"expect": 0, "plain": 0}

        def body(kind: str) -> AsyncIterator[bytes]:
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(40):  # 2.5 MB
                    pulled[kind] += 1
                    yield b"\xff" * 65536
            return chunks()

        headers = {"content-type": "image/jpeg"}
        waiting = await c.post("/predict", content=body("expect"), headers={**headers, "expect": "100-continue"})
        assert_error(waiting, 503, "overloaded")
        assert waiting.headers["connection"] == "close" and waiting.headers["retry-after"] == "1"
        plain = await c.post("/predict", content=body("plain"), headers=headers)
        assert_error(plain, 503, "overloaded")
        assert "connection" not in plain.headers
        assert pulled["expect"] <= 1 and pulled["plain"] == 40
        assert [r.status_code for r in await asyncio.gather(*busy)] == [200, 200]


def batch_of(jpegs: list[bytes]) -> dict[str, Any]:
    return {"files": [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(jpegs)]}


async def test_each_image_of_a_batch_takes_its_own_admission_slot(
    settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    """A batch of four counts as four requests: three such batches against six slots (a queue of
    four, batches of two) are not all queued; the ones refused get 503 at once, the one admitted
    is answered in full, and a batch that could never fit gets 413, whatever the load."""
    slow = WrappedEngine(engine, delay=0.2)
    tight = settings.model_copy(update={"max_queue": 4, "max_batch_size": 2, "cache_size": 0})
    four = batch_of([photo_jpegs[n] for n in ("rocket", "chelsea", "coffee", "astronaut")])
    async for c in client_for(tight, slow):
        responses = await asyncio.gather(*(c.post("/predict/batch", **four) for _ in range(3)))
        answered = [r for r in responses if r.status_code == 200]
        assert len(answered) == 1, [r.status_code for r in responses]
        assert [item["status"] for item in answered[0].json()["results"]] == [200] * 4
        for refused in (r for r in responses if r.status_code != 200):
            assert_error(refused, 503, "overloaded")
            assert refused.headers["Retry-After"] == "1"
        assert sum(slow.batch_sizes) == 4  # nothing of the refused batches reached the model
        seven = batch_of([photo_jpegs["rocket"]] * 7)
        too_many = await c.post("/predict/batch", **seven)
        assert_error(too_many, 413, "payload_too_large")
        assert "at most 6" in too_many.json()["error"]["message"]
        assert 'resnet_serve_in_flight{model="resnet18"} 0.0' in (await c.get("/metrics")).text


async def test_protocol_requests_take_a_slot_per_image_and_answer_in_its_error_shape(
    settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    tight = settings.model_copy(update={"max_queue": 4, "max_batch_size": 2})
    data = [base64.b64encode(photo_jpegs["rocket"]).decode()] * 7
    body = {"inputs": [{"name": "INPUT", "shape": [7], "datatype": "BYTES", "data": data}]}
    async for c in client_for(tight, engine):
        refused = await c.post("/v2/models/resnet18/infer", json=body)
        assert refused.status_code == 413 and "at most 6" in refused.json()["error"]
        body["inputs"][0].update(shape=[6], data=data[:6])
        assert (await c.post("/v2/models/resnet18/infer", json=body)).json()["outputs"][0]["shape"] == [6, 1000]
        assert 'resnet_serve_in_flight{model="resnet18"} 0.0' in (await c.get("/metrics")).text


async def test_past_the_deadline_the_answer_is_504(settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]) -> None:
    slow = WrappedEngine(engine, delay=1.0)
    hurried = settings.model_copy(update={"request_timeout_s": 0.3})
    async for c in client_for(hurried, slow):
        assert_error(await c.post("/predict", **upload(photo_jpegs["rocket"])), 504, "deadline_exceeded")


async def test_a_failing_batch_is_a_500_and_the_service_keeps_serving(
    settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    faulty = WrappedEngine(engine, failures=1)
    async for c in client_for(settings, faulty):
        assert_error(await c.post("/predict", **upload(photo_jpegs["rocket"])), 500, "inference_failed")
        assert (await c.post("/predict", **upload(photo_jpegs["rocket"]))).status_code == 200


async def test_starts_unready_then_warms_up_with_random_init_said_loudly(
    tmp_path: object, photo_jpegs: dict[str, bytes]
) -> None:
    settings = Settings(weights_mode="random", allow_download=False, device="cpu", max_batch_size=2,
                        runtime="torchscript")
    async for c in client_for(settings, None):
        first = await c.get("/health/ready")
        if first.status_code == 503:  # still compiling: predictions are refused, not queued
            assert first.json()["status"] == "loading"
            assert_error(await c.post("/predict", **upload(photo_jpegs["rocket"])), 503, "not_ready")
            assert_error(await c.get("/model"), 503, "not_ready")
        await until_ready(c)
        ready = (await c.get("/health/ready")).json()
        assert ready == {"status": "ready", "weights": "random-init", "runtime": "torchscript", "detail": None}
        response = await c.post("/predict", **upload(photo_jpegs["rocket"]))
        assert response.status_code == 200
        assert response.headers["X-Model-Weights"] == "random-init" == response.json()["weights"]
        assert (await c.get("/model")).json()["weights"] == "random-init"


def test_official_mode_without_the_file_refuses_to_start(tmp_path: object) -> None:
    from asgi_lifespan import LifespanManager

    from resnet_serve.errors import WeightsError

    settings = Settings(weights_mode="official", allow_download=False, weights_dir=tmp_path)  # type: ignore[arg-type]

    async def start() -> None:
        async with LifespanManager(create_app(settings)):
            pass

    with pytest.raises(WeightsError, match="official"):
        asyncio.run(start())


async def test_a_png_upload_with_a_wrong_content_type_is_still_decoded(
    client: httpx.AsyncClient, photos: dict[str, Image.Image]
) -> None:
    png = encode(photos["horse"], "PNG")
    response = await client.post("/predict", **upload(png, "horse.jpg", "image/jpeg"))
    assert response.status_code == 200 and response.json()["image"]["format"] == "PNG"


async def test_a_client_that_disconnects_frees_its_queue_slot() -> None:
    from resnet_serve.batcher import Pending
    from resnet_serve.errors import MalformedRequest
    from resnet_serve.pipeline import await_result

    async def client_gone() -> None:
        await asyncio.sleep(0.01)

    loop = asyncio.get_running_loop()
    pending: Pending[np.ndarray, Prediction] = Pending(np.zeros(1), loop.create_future(), 0.0, 1e12)
    with pytest.raises(MalformedRequest, match="disconnected"):
        await await_result(pending, timeout_s=5, abandoned=client_gone)
    assert pending.future.cancelled()  # the batcher will drop it before inference


async def test_a_waiter_that_is_cancelled_cancels_its_request() -> None:
    """As when ``predict`` is stopped by Ctrl-C: the request must not run for no one, nor leave
    a future whose exception asyncio reports as never retrieved when the batcher closes."""
    from resnet_serve.batcher import Pending
    from resnet_serve.pipeline import await_result

    loop = asyncio.get_running_loop()
    pending: Pending[np.ndarray, Prediction] = Pending(np.zeros(1), loop.create_future(), 0.0, 1e12)
    waiter = asyncio.create_task(await_result(pending, timeout_s=30))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pending.future.cancelled()


async def test_the_same_bytes_again_are_answered_from_the_cache(settings: Settings, engine: Engine,
                                                                photo_jpegs: dict[str, bytes]) -> None:
    counting = WrappedEngine(engine)
    async for c in client_for(settings, counting):
        first = (await c.post("/predict?top_k=5", **upload(photo_jpegs["coffee"]))).json()
        again = (await c.post("/predict?top_k=2&lang=zh", **upload(photo_jpegs["coffee"], "other.jpg"))).json()
        assert counting.batch_sizes == [1]  # the second request never reached the model
        assert first["cached"] is False and again["cached"] is True
        assert (again["batch_size"], again["inference_time_ms"], again["queue_time_ms"]) == (0, 0, 0)
        assert [p["class_id"] for p in again["predictions"]] == [p["class_id"] for p in first["predictions"][:2]]
        assert again["predictions"][0]["label"] == again["predictions"][0]["label_zh"]
        assert again["image"] == {**first["image"], "filename": "other.jpg"}
        other = (await c.post("/predict", **upload(photo_jpegs["coffee"] + b"\x00"))).json()
        assert other["cached"] is False and counting.batch_sizes == [1, 1]


async def test_a_cache_size_of_zero_turns_the_cache_off(settings: Settings, engine: Engine,
                                                        photo_jpegs: dict[str, bytes]) -> None:
    counting = WrappedEngine(engine)
    async for c in client_for(settings.model_copy(update={"cache_size": 0}), counting):
        for _ in range(2):
            assert (await c.post("/predict", **upload(photo_jpegs["coffee"]))).json()["cached"] is False
        assert counting.batch_sizes == [1, 1]


async def test_metrics_expose_requests_batches_queue_and_cache(client: httpx.AsyncClient,
                                                               photo_jpegs: dict[str, bytes]) -> None:
    def sample(text: str, name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name) and (not labels or "{" + wanted + "}" in line or wanted in line):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = (await client.get("/metrics")).text
    await client.post("/predict", **upload(photo_jpegs["horse"] + b"metrics"))
    await client.post("/predict", **upload(photo_jpegs["horse"] + b"metrics"))  # a cache hit
    await client.post("/predict?top_k=99", **upload(photo_jpegs["horse"]))
    response = await client.get("/metrics")
    after = response.text
    assert response.headers["content-type"].startswith("text/plain")
    ok = 'resnet_serve_requests_total{method="POST",route="/predict",status="200"}'
    bad = 'resnet_serve_requests_total{method="POST",route="/predict",status="422"}'
    assert sample(after, ok) - sample(before, ok) == 2
    assert sample(after, bad) - sample(before, bad) == 1
    assert sample(after, "resnet_serve_batch_size_count") - sample(before, "resnet_serve_batch_size_count") == 1
    assert sample(after, "resnet_serve_inference_seconds_count") > sample(before, "resnet_serve_inference_seconds_count")
    assert sample(after, "resnet_serve_queue_wait_seconds_count") > sample(before, "resnet_serve_queue_wait_seconds_count")
    hits = 'resnet_serve_cache_lookups_total{model="resnet18",result="hit"}'
    assert sample(after, hits) - sample(before, hits) == 1
    assert 'resnet_serve_model_info{device="cpu",model="resnet18",precision="fp32",runtime="torchscript",weights="custom"} 1.0' in after
    assert "resnet_serve_queue_depth" in after and "resnet_serve_request_duration_seconds_bucket" in after


def test_no_route_hands_its_dependencies_to_a_worker_thread() -> None:
    """FastAPI runs a plain function or a class given to ``Depends`` (and a plain endpoint) on
    anyio's worker threads: a thread hop per request. Every endpoint and dependency is async."""
    def calls(dependant: Dependant) -> list[object]:
        return [dependant.call, *(call for sub in dependant.dependencies for call in calls(sub))]

    routes = [route for router in routers() for route in router.routes if isinstance(route, APIRoute)]
    assert {"/predict", "/explain", "/health/ready", "/v2/models/{name}/infer"} <= {r.path for r in routes}
    sync = {(r.path, getattr(call, "__qualname__", call)) for r in routes for call in calls(r.dependant)
            if not inspect.iscoroutinefunction(call)}
    assert not sync
