"""The Open Inference Protocol v2 endpoints and /predict/batch, with the real model."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights

from resnet_serve.inference import Engine
from resnet_serve.settings import Settings
from resnet_serve.spec import RESNET18
from tests.conftest import probs_of as model_probs
from tests.conftest import ready_client, real_server, wait_ready

INFER = "/v2/models/resnet18/infer"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_server_and_model_metadata(client: httpx.AsyncClient) -> None:
    extensions = (await client.get("/v2")).json()["extensions"]
    assert {"classification", "binary_tensor_data", "model_repository", "statistics"} <= set(extensions)
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await client.get("/v2/models/resnet18/ready")).json() == {"ready": True, "name": "resnet18"}
    meta = (await client.get("/v2/models/resnet18")).json()
    assert meta["name"] == "resnet18" and meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
    assert {i["datatype"] for i in meta["inputs"]} == {"BYTES", "FP32"}
    assert len({i["name"] for i in meta["inputs"]}) == 2  # unique names, as clients index them by name


async def test_bytes_input_in_json_gives_the_models_probabilities(
    client: httpx.AsyncClient, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    images = [photo_jpegs["chelsea"], photo_jpegs["rocket"]]
    body = {"id": "r1", "inputs": [{"name": "INPUT", "shape": [2], "datatype": "BYTES", "data": [b64(i) for i in images]}]}
    answer = (await client.post(INFER, json=body)).json()
    assert answer["id"] == "r1" and answer["model_name"] == "resnet18"
    (output,) = answer["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [2, 1000]
    got = torch.tensor(output["data"]).view(2, 1000)
    assert torch.allclose(got, await model_probs(engine, images), atol=1e-6)


async def test_the_classification_extension(client: httpx.AsyncClient, engine: Engine, photo_jpegs: dict[str, bytes]) -> None:
    body = {"inputs": [{"name": "INPUT", "shape": [1], "datatype": "BYTES", "data": [b64(photo_jpegs["coffee"])]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    (output,) = (await client.post(INFER, json=body)).json()["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 3]
    values, indices = (await model_probs(engine, [photo_jpegs["coffee"]]))[0].topk(3)
    for text, value, index in zip(output["data"], values.tolist(), indices.tolist()):
        score, class_id, label = text.split(":", 2)
        assert int(class_id) == index and float(score) == pytest.approx(value, abs=1e-6)
        assert label == RESNET18.categories[index]


async def test_fp32_preprocessed_input_matches_the_image_path(
    client: httpx.AsyncClient, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    reference = ResNet18_Weights.IMAGENET1K_V1.transforms()
    image = Image.open(io.BytesIO(photo_jpegs["astronaut"])).convert("RGB")
    tensor = reference(image).unsqueeze(0)
    body = {"inputs": [{"name": "INPUT", "shape": [1, 3, 224, 224], "datatype": "FP32",
                        "data": tensor.flatten().tolist()}]}
    (output,) = (await client.post(INFER, json=body)).json()["outputs"]
    got = torch.tensor(output["data"]).view(1, 1000)
    assert torch.allclose(got, await model_probs(engine, [photo_jpegs["astronaut"]]), atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": []}, 400, "exactly one input"),
        ({"inputs": [{"name": "INPUT", "shape": [1], "datatype": "INT8", "data": [1]}]}, 400, "not supported"),
        ({"inputs": [{"name": "INPUT", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}, 400, "shape says 2"),
        ({"inputs": [{"name": "INPUT", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, 400, "base64"),
        ({"inputs": [{"name": "INPUT", "shape": [1], "datatype": "BYTES", "data": [b64(b"hello")]}]}, 415, "not an image"),
        ({"inputs": [{"name": "INPUT", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}, 400, "shape"),
        ({"inputs": [{"name": "INPUT", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [0.0]}]}, 400, "fill"),
        ({"inputs": [{"name": "INPUT", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
          "outputs": [{"name": "logits"}]}, 400, "unknown output"),
        ({"nonsense": True}, 400, "not valid JSON"),
    ],
)
async def test_bad_inference_requests_get_protocol_errors(client: httpx.AsyncClient, body: dict[str, object],
                                                          status: int, fragment: str) -> None:
    response = await client.post(INFER, json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and fragment in response.json()["error"]


async def test_predict_batch_answers_each_file_on_its_own(
    client: httpx.AsyncClient, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    files = [("files", ("cat.jpg", photo_jpegs["chelsea"], "image/jpeg")),
             ("files", ("notes.txt", b"not an image", "text/plain")),
             ("files", ("rocket.jpg", photo_jpegs["rocket"], "image/jpeg"))]
    response = await client.post("/predict/batch?top_k=2", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["index"], r["filename"], r["status"]) for r in results] == [
        (0, "cat.jpg", 200), (1, "notes.txt", 415), (2, "rocket.jpg", 200)]
    assert results[1]["error"]["code"] == "unsupported_media_type" and results[1]["result"] is None
    expected = await model_probs(engine, [photo_jpegs["chelsea"], photo_jpegs["rocket"]])
    for result, probs in zip((results[0], results[2]), expected):
        assert [p["class_id"] for p in result["result"]["predictions"]] == probs.topk(2).indices.tolist()
    too_many = [("files", (f"{i}.jpg", photo_jpegs["rocket"], "image/jpeg")) for i in range(33)]
    refused = await client.post("/predict/batch", files=too_many)
    assert refused.status_code == 422 and "at most 32" in refused.json()["error"]["message"]


@pytest.fixture(scope="module")
def triton_url(seeded_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("v2") / "server.log"
    with real_server(log, weights=str(seeded_weights), allow_download="false", device="cpu") as (url, process):
        wait_ready(url, process)
        yield url


def test_the_real_tritonclient_talks_to_us(triton_url: str, photo_jpegs: dict[str, bytes], engine: Engine) -> None:

    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=triton_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("resnet18")
    assert client.get_model_metadata("resnet18")["name"] == "resnet18"
    images = [photo_jpegs["horse"], photo_jpegs["coffee"]]
    tensor = triton.InferInput("INPUT", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)  # the binary extension
    probs = client.infer("resnet18", [tensor], outputs=[triton.InferRequestedOutput("probabilities")])
    expected = asyncio.run(model_probs(engine, images))
    assert np.allclose(probs.as_numpy("probabilities"), expected.numpy(), atol=1e-6)
    top = client.infer("resnet18", [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
    labels = top.as_numpy("probabilities")
    assert labels.shape == (2, 2)
    texts = [item.decode() if isinstance(item, bytes) else item for item in labels[0]]
    assert [int(text.split(":")[1]) for text in texts] == expected[0].topk(2).indices.tolist()


async def test_the_metadata_names_the_runtime_that_really_runs(
    client: httpx.AsyncClient, seeded_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    photo_jpegs: dict[str, bytes],
) -> None:
    assert (await client.get("/v2/models/resnet18")).json()["platform"] == "pytorch_torchscript"
    for name, value in {"RUNTIME": "onnxruntime", "WEIGHTS": str(seeded_weights), "ALLOW_DOWNLOAD": "false",
                        "COMPILED_CACHE_DIR": str(tmp_path), "MAX_BATCH_SIZE": "2"}.items():
        monkeypatch.setenv(f"RESNET_SERVE_{name}", value)
    async for c in ready_client(Settings()):
        assert (await c.get("/health/ready")).json()["runtime"] == "onnxruntime"
        assert (await c.get("/v2/models/resnet18")).json()["platform"] == "onnxruntime_onnx"
        assert (await c.get("/model")).json()["platform"] == "onnxruntime_onnx"
        body = {"inputs": [{"name": "INPUT", "shape": [1], "datatype": "BYTES", "data": [b64(photo_jpegs["horse"])]}]}
        assert (await c.post(INFER, json=body)).status_code == 200


async def test_unknown_models_and_paths_answer_in_the_protocols_shape(client: httpx.AsyncClient) -> None:
    for method, path, status in [("GET", "/v2/models/nope", 404), ("POST", "/v2/models/nope/infer", 404),
                                 ("GET", "/v2/nothing/here", 404), ("PUT", "/v2/health/live", 405)]:
        response = await client.request(method, path)
        assert response.status_code == status, (method, path)
        assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)
    assert "resnet18" in (await client.get("/v2/models/nope")).json()["error"]
