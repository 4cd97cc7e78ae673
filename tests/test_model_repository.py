"""A repository of several models served at once: each model with its own labels, pipeline and
state; a damaged one isolated; the protocol per model, with Triton's own client."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from resnet_serve.backends.torch.checkpoints import read_checkpoint
from resnet_serve.backends.torch.graph import ServingNetwork, build_network
from resnet_serve.http.app import create_app
from resnet_serve.repository import Repository
from resnet_serve.settings import Settings
from resnet_serve.transform import preprocess
from tests.conftest import FLOWERS, PARTS, open_client, ready_client, real_server, until_ready, wait_ready


def served(repository: Path, **changes: object) -> Settings:
    return Settings(model_repository=repository, device="cpu", torch_threads=1, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def client(user_repository: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in ready_client(served(user_repository)):
        yield c


def upload(data: bytes) -> dict[str, object]:
    return {"files": {"file": ("photo.jpg", data, "image/jpeg")}}


def eager_probs(checkpoint: Path, name: str, repository: Path, photos: list[bytes]) -> np.ndarray:
    """Eager PyTorch on the same pixels: the user's checkpoint in torchvision's network."""
    spec = Repository(repository).latest()[name].spec
    assert spec is not None
    net = build_network(spec)
    net.load_state_dict(read_checkpoint(checkpoint))
    model = ServingNetwork(net.eval(), spec, torch.float32, channels_last=False).eval()
    pixels = np.stack([preprocess(p, spec, max_pixels=10**9).pixels for p in photos])
    with torch.no_grad():
        return model(torch.from_numpy(pixels)).numpy()


async def test_each_model_answers_with_its_own_labels(client: httpx.AsyncClient, photo_jpegs: dict[str, bytes]) -> None:
    for name, labels in (("flowers", FLOWERS), ("parts", list(PARTS.values()))):
        response = await client.post(f"/predict?model={name}&top_k=20", **upload(photo_jpegs["chelsea"]))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == name and body["model_version"] == 1 and body["weights"] == "custom"
        assert sorted(p["label"] for p in body["predictions"]) == sorted(labels)  # top_k capped at the classes
        assert all(p["label_zh"] == p["label_en"] for p in body["predictions"])  # no Chinese names given
    default = (await client.post("/predict", **upload(photo_jpegs["chelsea"]))).json()
    assert default["model"] == "flowers"  # no resnet18 here: the first by name


async def test_fp32_probabilities_equal_eager_pytorch(client: httpx.AsyncClient, photo_jpegs: dict[str, bytes],
                                                      user_files: dict[str, Path], user_repository: Path) -> None:
    photos = [photo_jpegs[n] for n in ("chelsea", "coffee", "rocket", "horse")]
    for name in ("flowers", "parts"):
        body = {"inputs": [{"name": "INPUT", "shape": [len(photos)], "datatype": "BYTES",
                            "data": [base64.b64encode(p).decode() for p in photos]}]}
        answer = await client.post(f"/v2/models/{name}/infer", json=body)
        assert answer.status_code == 200, answer.text
        (output,) = answer.json()["outputs"]
        got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        expected = eager_probs(user_files[name], name, user_repository, photos)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4


async def test_the_models_are_listed_and_each_has_its_own_settings(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/models")).json()
    assert listing["default"] == "flowers"
    states = {m["name"]: (m["state"], m["architecture"], m["num_classes"], m["default"]) for m in listing["models"]}
    assert states == {"flowers": ("READY", "resnet18", 5, True), "parts": ("READY", "mobilenet_v3_small", 3, False)}
    flowers = (await client.get("/model?model=flowers")).json()
    parts = (await client.get("/model", params={"model": "parts"})).json()
    assert (flowers["max_batch_size"], parts["max_batch_size"]) == (2, 4)  # from flowers' metadata
    assert (await client.get("/labels?model=parts")).json()["count"] == 3


@pytest.mark.parametrize("name", ["roses", "../etc", "FLOWERS", "%2e%2e"])
async def test_an_unknown_or_malformed_model_is_404_listing_the_models(client: httpx.AsyncClient, name: str,
                                                                      photo_jpegs: dict[str, bytes]) -> None:
    response = await client.post("/predict", params={"model": name}, **upload(photo_jpegs["rocket"]))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "flowers, parts" in error["message"]
    assert (await client.get("/v2/models/roses")).status_code == 404


async def test_metrics_carry_the_model(client: httpx.AsyncClient, photo_jpegs: dict[str, bytes]) -> None:
    await client.post("/predict?model=parts", **upload(photo_jpegs["horse"]))
    text = (await client.get("/metrics")).text
    assert 'resnet_serve_batch_size_count{model="parts"}' in text
    assert 'resnet_serve_model_info{device="cpu",model="flowers"' in text


def new_version(repository: Path, name: str, version: int, rename: tuple[str, str] | None = None) -> None:
    """Version ``version`` of ``name``: the latest one's artefacts, and one label ``rename``d (so its answers tell)."""
    latest = max(int(p.name) for p in (repository / name).iterdir() if p.name.isdigit())
    folder = repository / name / str(version)
    shutil.copytree(repository / name / str(latest), folder)
    metadata = folder / "model.json"
    metadata.write_text(metadata.read_text().replace(f'"version": {latest}', f'"version": {version}'))
    if rename is not None:
        labels = folder / "labels.tsv"
        labels.write_text(labels.read_text().replace(f"\t{rename[0]}\t", f"\t{rename[1]}\t"))


@pytest.fixture
def damaged(user_repository: Path, tmp_path: Path) -> Path:
    """The same repository, with parts' TorchScript artefact damaged (one byte flipped)."""
    copy = tmp_path / "repository"
    shutil.copytree(user_repository, copy)
    artefact = copy / "parts" / "1" / "model.fp32.pt"
    data = bytearray(artefact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artefact.write_bytes(bytes(data))
    return copy


async def test_a_damaged_artefact_isolates_its_model(damaged: Path, photo_jpegs: dict[str, bytes]) -> None:
    async for client in ready_client(served(damaged, runtime="torchscript")):
        assert (await client.post("/predict?model=flowers", **upload(photo_jpegs["coffee"]))).status_code == 200
        refused = await client.post("/predict?model=parts", **upload(photo_jpegs["coffee"]))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
        assert "SHA-256" in refused.json()["error"]["message"]
        assert (await client.get("/v2/models/parts/ready")).status_code == 503
        assert (await client.get("/v2/models/flowers/ready")).status_code == 200
        index = {row["name"]: row for row in (await client.post("/v2/repository/index")).json()}
        assert index["parts"]["state"] == "UNAVAILABLE" and "SHA-256" in index["parts"]["reason"]
        assert index["flowers"]["state"] == "READY"
        health = await client.get("/health/ready")
        assert health.status_code == 200 and "parts" in health.json()["detail"]


async def test_with_runtime_auto_a_damaged_artefact_is_left_out_loudly(damaged: Path, tmp_path: Path,
                                                                        photo_jpegs: dict[str, bytes]) -> None:
    async for client in ready_client(served(damaged, runtime="auto", compiled_cache_dir=tmp_path)):
        assert (await client.post("/predict?model=parts", **upload(photo_jpegs["coffee"]))).status_code == 200
        parts = (await client.get("/model?model=parts")).json()
        assert parts["runtime"] in ("onnxruntime", "openvino")  # both serve the intact ONNX artefact
        assert "fails its SHA-256 check" in parts["runtime_reason"]


async def test_a_missing_artefact_is_reported_and_an_other_runtime_still_serves(
    damaged: Path, photo_jpegs: dict[str, bytes]
) -> None:
    (damaged / "flowers" / "1" / "model.fp32.onnx").unlink()
    async for client in ready_client(served(damaged, runtime="onnxruntime")):
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        assert models["flowers"]["state"] == "UNAVAILABLE" and "missing" in models["flowers"]["reason"]
        assert models["parts"]["state"] == "READY" and models["parts"]["runtime"] == "onnxruntime"
        assert (await client.post("/predict?model=parts", **upload(photo_jpegs["coffee"]))).status_code == 200


async def test_the_latest_version_is_served_and_the_index_lists_the_others(
    user_repository: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "repository"
    shutil.copytree(user_repository, copy)
    new_version(copy, "flowers", 2)
    async for client in ready_client(served(copy, default_model="parts")):
        assert (await client.get("/models")).json()["default"] == "parts"
        assert (await client.get("/v2/models/flowers/versions/2")).json()["versions"] == ["2"]
        old = await client.get("/v2/models/flowers/versions/1/ready")
        assert old.status_code == 404 and "the version served is 2" in old.json()["error"]
        rows = (await client.post("/v2/repository/index", json={})).json()
        assert [(r["name"], r["version"], r["state"]) for r in rows] == [
            ("flowers", "1", "UNAVAILABLE"), ("flowers", "2", "READY"), ("parts", "1", "READY")]
        ready_only = (await client.post("/v2/repository/index", json={"ready": True})).json()
        assert {(r["name"], r["version"]) for r in ready_only} == {("flowers", "2"), ("parts", "1")}


@pytest.fixture
async def controlled(user_repository: Path, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    """A server of a copy of the repository with explicit model control, and that copy."""
    copy = tmp_path / "repository"
    shutil.copytree(user_repository, copy)
    async for client in ready_client(served(copy, model_control="explicit", shutdown_grace_s=5.0)):
        yield client, copy


async def test_a_new_version_is_loaded_without_a_restart_and_no_request_is_lost(
    controlled: tuple[httpx.AsyncClient, Path], photo_jpegs: dict[str, bytes]
) -> None:
    client, repository = controlled
    new_version(repository, "flowers", 2, ("rose", "rose v2"))
    photos = [photo_jpegs[n] for n in ("chelsea", "coffee", "horse", "rocket")]

    async def classify(data: bytes) -> dict[str, object]:
        response = await client.post("/predict?model=flowers&top_k=5", **upload(data))
        assert response.status_code == 200, response.text
        return response.json()

    loading = asyncio.Event()
    versions: list[int] = []

    async def keep_asking(data: bytes) -> None:  # from before the load until after it
        while not loading.is_set() or len(versions) < 8:
            unique = data + os.urandom(8)  # a trailer JPEG decoders ignore: no answer from the result cache
            versions.append((await classify(unique))["model_version"])

    clients = asyncio.gather(*(keep_asking(p) for p in photos))
    while len(versions) < 4 and not clients.done():
        await asyncio.sleep(0.01)
    loaded = await client.post("/v2/repository/models/flowers/load", json={})
    loading.set()
    versions.clear()
    await clients
    assert loaded.status_code == 200 and loaded.json() == {}
    assert set(versions) == {2}
    after = await classify(photos[0])
    assert after["model_version"] == 2 and "rose v2" in [p["label"] for p in after["predictions"]]
    assert (await client.get("/v2/models/flowers")).json()["versions"] == ["2"]
    rows = {(r["name"], r["version"]): r["state"] for r in (await client.post("/v2/repository/index")).json()}
    assert rows == {("flowers", "1"): "UNAVAILABLE", ("flowers", "2"): "READY", ("parts", "1"): "READY"}
    again = await client.post("/v2/repository/models/flowers/load")  # already the latest: nothing to do
    assert again.status_code == 200 and (await classify(photos[1]))["model_version"] == 2


async def test_unload_then_load_and_a_model_exported_since_the_start(
    controlled: tuple[httpx.AsyncClient, Path], photo_jpegs: dict[str, bytes]
) -> None:
    client, repository = controlled
    assert (await client.post("/v2/repository/models/parts/unload")).status_code == 200
    refused = await client.post("/predict?model=parts", **upload(photo_jpegs["coffee"]))
    assert refused.status_code == 503 and "unloaded" in refused.json()["error"]["message"]
    models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    assert (models["parts"]["state"], models["parts"]["reason"]) == ("UNAVAILABLE", "unloaded")
    assert (await client.get("/v2/models/parts/ready")).status_code == 503
    assert (await client.post("/v2/repository/models/parts/load")).status_code == 200
    assert (await client.post("/predict?model=parts", **upload(photo_jpegs["coffee"]))).status_code == 200
    shutil.copytree(repository / "flowers", repository / "roses")
    for metadata in (repository / "roses").glob("*/model.json"):
        metadata.write_text(metadata.read_text().replace('"name": "flowers"', '"name": "roses"'))
    assert (await client.post("/predict?model=roses", **upload(photo_jpegs["coffee"]))).status_code == 404
    assert (await client.post("/v2/repository/models/roses/load")).status_code == 200
    assert (await client.post("/predict?model=roses", **upload(photo_jpegs["coffee"]))).json()["model"] == "roses"


async def test_a_load_that_fails_leaves_the_version_served(
    controlled: tuple[httpx.AsyncClient, Path], photo_jpegs: dict[str, bytes]
) -> None:
    client, repository = controlled
    new_version(repository, "flowers", 2, ("rose", "rose v2"))
    for artefact in (repository / "flowers" / "2").glob("model.*[!n]"):  # every artefact, not model.json
        artefact.write_bytes(artefact.read_bytes()[:1000])
    failed = await client.post("/v2/repository/models/flowers/load")
    assert failed.status_code == 400 and "flowers/2 failed to load" in failed.json()["error"]
    answer = await client.post("/predict?model=flowers", **upload(photo_jpegs["coffee"]))
    assert answer.status_code == 200 and answer.json()["model_version"] == 1
    missing = await client.post("/v2/repository/models/tulips/load")
    assert missing.status_code == 404 and "no model 'tulips'" in missing.json()["error"]
    override = await client.post("/v2/repository/models/flowers/load", json={"parameters": {"config": "{}"}})
    assert override.status_code == 400 and "config cannot override" in override.json()["error"]
    for path, body in (("/v2/repository/models/flowers/load", b"not json"), ("/v2/repository/index", b"[1]")):
        malformed = await client.post(path, content=body)
        assert malformed.status_code == 400 and "the request is JSON" in malformed.json()["error"]
    for path in ("/v2/repository/models/flowers/load", "/v2/repository/index"):  # read only so far
        huge = await client.post(path, content=b"{" + b" " * (1024 * 1024) + b"}")
        assert huge.status_code == 413 and "limit" in huge.json()["error"]


async def test_a_stop_during_a_load_waits_for_it_and_the_load_gives_up(user_repository: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repository"
    shutil.copytree(user_repository, copy)
    app = create_app(served(copy, model_control="explicit"))
    async for client in open_client(app):
        await until_ready(client)
        new_version(copy, "flowers", 2, ("rose", "rose v2"))
        service = app.state.service
        load = asyncio.ensure_future(client.post("/v2/repository/models/flowers/load"))
        while not service._control.locked():  # the load is under way
            await asyncio.sleep(0.001)
        await service.stop()
        assert not service._control.locked()  # the stop waited for the load
        answer = await load
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]
        assert all(not m.pipeline.engine.alive for m in service.models.values() if m.pipeline)
        assert service.models["flowers"].version == 1


async def test_model_control_needs_the_api_key_when_one_is_set(user_repository: Path) -> None:
    async for client in ready_client(served(user_repository, model_control="explicit", api_key="s3cret")):
        refused = await client.post("/v2/repository/models/parts/unload")
        assert refused.status_code == 401 and (await client.get("/v2/models/parts/ready")).status_code == 200
        assert (await client.post("/v2/repository/models/parts/unload", headers={"X-API-Key": "s3cret"})).status_code == 200


async def test_model_control_is_off_unless_asked_and_needs_one_worker(client: httpx.AsyncClient) -> None:
    for action in ("load", "unload"):
        refused = await client.post(f"/v2/repository/models/flowers/{action}")
        assert refused.status_code == 403 and "RESNET_SERVE_MODEL_CONTROL=explicit" in refused.json()["error"]
    with pytest.raises(ValueError, match="needs one worker"):
        Settings(model_control="explicit", workers=2)


async def test_a_default_model_that_is_not_there_stops_the_start(user_repository: Path) -> None:
    from asgi_lifespan import LifespanManager

    from resnet_serve.errors import RepositoryError

    with pytest.raises(RepositoryError, match="RESNET_SERVE_DEFAULT_MODEL=roses is not in"):
        async with LifespanManager(create_app(served(user_repository, default_model="roses"))):
            pass


@pytest.fixture(scope="module")
def repository_url(user_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("repo-server") / "server.log"
    with real_server(log, "--model-repository", str(user_repository), device="cpu", torch_threads="1") as (url, process):
        wait_ready(url, process)
        yield url


def test_tritonclient_sees_every_model_its_config_stats_and_the_index(
    repository_url: str, photo_jpegs: dict[str, bytes]
) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=repository_url.removeprefix("http://"))
    images = np.array([photo_jpegs["horse"], photo_jpegs["rocket"]], dtype=np.object_)
    for name, labels in (("flowers", FLOWERS), ("parts", list(PARTS.values()))):
        assert client.is_model_ready(name) and client.is_model_ready(name, model_version="1")
        metadata = client.get_model_metadata(name)
        assert len({i["name"] for i in metadata["inputs"]}) == 2
        tensor = triton.InferInput("INPUT", [2], "BYTES")
        tensor.set_data_from_numpy(images, binary_data=True)
        top = client.infer(name, [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
        texts = [t.decode() if isinstance(t, bytes) else t for t in top.as_numpy("probabilities").ravel()]
        assert {text.split(":", 2)[2] for text in texts} <= set(labels)
        config = client.get_model_config(name)
        assert config["output"][0]["dims"] == [len(labels)] and config["input"][0]["name"] == "INPUT"
        assert config["max_batch_size"] == (2 if name == "flowers" else 4) and "dynamic_batching" in config
        (stats,) = client.get_inference_statistics(name)["model_stats"]
        assert stats["inference_count"] >= 2 and stats["inference_stats"]["success"]["count"] >= 2
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} == {("flowers", "READY"), ("parts", "READY")}
    with pytest.raises(triton.InferenceServerException, match="unknown|no model"):
        client.get_model_metadata("roses")  # the error string reaches the client intact


def test_tritonclient_unloads_and_loads_a_model(user_repository: Path, tmp_path: Path) -> None:
    """Triton's explicit model control, through Triton's own client and a real server process."""
    import tritonclient.http as triton

    copy = tmp_path / "repository"
    shutil.copytree(user_repository, copy)
    with real_server(tmp_path / "server.log", "--model-repository", str(copy), device="cpu", torch_threads="1",
                     model_control="explicit") as (url, process):
        wait_ready(url, process)
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        client.unload_model("parts")
        assert not client.is_model_ready("parts") and client.is_model_ready("flowers")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert (index["parts"]["state"], index["parts"]["reason"]) == ("UNAVAILABLE", "unloaded")
        new_version(copy, "parts", 2, ("nut", "hex nut"))
        client.load_model("parts")
        assert client.is_model_ready("parts", model_version="2") and client.get_model_metadata("parts")["versions"] == ["2"]
        with pytest.raises(triton.InferenceServerException, match="no model 'gears'"):
            client.load_model("gears")
