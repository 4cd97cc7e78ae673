"""Explanations: Grad-CAM itself (known answers), the heatmap drawing, the explainer's queue and
deadline, and ``POST /explain`` through the HTTP API with the real ResNet-18."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from resnet_serve.backends.onnxruntime import OnnxCam
from resnet_serve.backends.torch.gradcam import GradCam, find_layer
from resnet_serve.backends.torch.graph import build_network_of
from resnet_serve.errors import DeadlineExceeded, ExplanationsUnavailable, Overloaded, RepositoryError
from resnet_serve.explain import Explainer, Target
from resnet_serve.heatmaps import colours, heatmap_image, image_box, place
from resnet_serve.http.app import create_app
from resnet_serve.inference import Engine
from resnet_serve.labels import Labels
from resnet_serve.loading import open_explainer
from resnet_serve.repository import Repository
from resnet_serve.settings import Settings
from resnet_serve.spec import RESNET18, ModelSpec
from resnet_serve.transform import to_pixels
from tests.conftest import as_jpeg, encode, open_client, until_ready

QUADRANT_SPEC = ModelSpec(name="quadrant", architecture="custom", labels=Labels(("top-right", "other"), ("右上", "其他")),
                          resize_size=64, crop_size=56)


class TopRightOnly(nn.Module):
    """A network that sees only the top-right quadrant of its input: its class score cannot depend
    on anything else, so an explanation must point there."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.head.weight[0].abs_()  # class 0 grows with every feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mask = torch.zeros_like(x)
        mask[..., : h // 2, w // 2 :] = 1.0
        return self.head(self.features(x * mask).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def quadrant_mass(values: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """The share of the map inside the top-right quarter of the crop ``box`` (image pixels)."""
    left, top, right, bottom = box
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    inside = values[round(top) : round(mid_y), round(mid_x) : round(right)].sum()
    return float(inside / values.sum())


def test_a_network_that_sees_one_quadrant_is_explained_there(photos: dict[str, Image.Image]) -> None:
    image = photos["chelsea"].resize((451, 300))  # landscape: the crop is a part of the image
    cam = GradCam(TopRightOnly(), QUADRANT_SPEC)
    explained = cam(to_pixels(image, QUADRANT_SPEC), classes=[0])
    box = image_box(451, 300, QUADRANT_SPEC)
    values, mask = place(explained.grids[0], 451, 300, box)
    assert cam.layer == "features" and values.shape == (300, 451)
    assert quadrant_mass(values, box) >= 0.8
    assert values[~mask].sum() == 0  # outside the crop: empty


def test_grad_cam_of_a_global_pool_and_linear_head_is_cam(reference_model: nn.Module,
                                                          photos: dict[str, Image.Image]) -> None:
    """For ResNet-18, Grad-CAM on layer4 equals CAM: relu(sum_k W[c, k] A_k), computed here
    independently of autograd."""
    pixels = to_pixels(photos["coffee"], RESNET18)
    explained = GradCam(reference_model, RESNET18)(pixels, top_k=2)
    captured: list[torch.Tensor] = []
    hook = reference_model.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    x = (torch.from_numpy(pixels)[None].float() / 255.0 - torch.tensor(RESNET18.mean).view(1, 3, 1, 1)) \
        / torch.tensor(RESNET18.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(reference_model(x), 1)[0]
    hook.remove()
    assert explained.layer == "layer4" and list(explained.grids) == probs.topk(2).indices.tolist()
    np.testing.assert_allclose(explained.probs, probs.numpy(), atol=1e-5)
    for class_id, grid in explained.grids.items():
        cam = torch.relu(torch.einsum("k,khw->hw", reference_model.fc.weight[class_id], captured[0][0]))
        assert grid.shape == (7, 7)
        np.testing.assert_allclose(grid, (cam / cam.max()).numpy(), atol=1e-4)


@pytest.mark.parametrize(("architecture", "layer"), [("resnet18", "layer4"), ("mobilenet_v3_small", "features"),
                                                      ("vgg11", "features")])
def test_the_last_convolutional_block_is_found(architecture: str, layer: str) -> None:
    assert find_layer(build_network_of(architecture, 3))[0] == layer


def test_a_named_layer_is_used_and_a_wrong_name_is_refused() -> None:
    net = build_network_of("resnet18", 3)
    assert find_layer(net, "layer3.1")[0] == "layer3.1"
    with pytest.raises(RepositoryError, match="no module 'layer9'"):
        find_layer(net, "layer9")


def test_the_heatmap_is_coloured_inside_the_crop_and_transparent_outside() -> None:
    grid = np.zeros((2, 2), dtype=np.float32)
    grid[0, 1] = 1.0  # hot top-right cell
    box = (100.0, 0.0, 400.0, 300.0)
    values, mask = place(grid, 500, 300, box)
    rgba = np.asarray(heatmap_image(values, mask))
    assert rgba.shape == (300, 500, 4)
    assert (rgba[:, :100, 3] == 0).all() and (rgba[:, 400:, 3] == 0).all() and (rgba[:, 100:400, 3] == 255).all()
    assert values[10, 390] > 0.9 and values[290, 110] < 0.1  # top-right hot, bottom-left cold
    red, blue = colours(np.array([1.0, 0.0], dtype=np.float32))
    assert red.tolist() == [128, 0, 0] and blue.tolist() == [0, 0, 128]  # jet: dark red (hot) to dark blue


def test_without_eager_weights_cam_explains_and_without_either_nothing_does(user_repository: Path) -> None:
    version = Repository(user_repository).latest()["flowers"]
    assert version.metadata is not None and version.spec is not None
    assert isinstance(open_explainer(version, version.spec), GradCam)
    artefacts = version.metadata.artefacts
    onnx_only = version.metadata.model_copy(update={"artefacts": [a for a in artefacts if a.format != "state_dict"]})
    assert isinstance(open_explainer(dataclasses.replace(version, metadata=onnx_only), version.spec), OnnxCam)
    compiled_only = version.metadata.model_copy(
        update={"artefacts": [a for a in artefacts if a.format in ("torchscript", "onnx")]})
    with pytest.raises(ExplanationsUnavailable, match="--format torchscript,state_dict"):
        open_explainer(dataclasses.replace(version, metadata=compiled_only), version.spec)


def test_cam_from_the_onnx_graph_equals_grad_cam_for_a_global_pool_and_linear_head(
        user_repository: Path, photos: dict[str, Image.Image]) -> None:
    """The torch-free path: the ONNX graph's features and the exported head give Grad-CAM's maps."""
    version = Repository(user_repository).latest()["flowers"]
    assert version.metadata is not None and version.spec is not None
    folder, spec = version.directory, version.spec
    assert version.metadata.artefact("cam", "fp32") is not None  # found at export: ResNet's head is pool + fc
    cam = OnnxCam(folder / "model.fp32.onnx", folder / "model.fp32.cam.npz")
    grad_cam = GradCam.load(folder / "model.fp32.state_dict.pt", spec)
    for name in ("chelsea", "rocket"):
        pixels = to_pixels(photos[name], spec)
        ours, reference = cam(pixels, top_k=3), grad_cam(pixels, top_k=3)
        assert (ours.method, ours.layer, list(ours.grids)) == ("cam", "layer4", list(reference.grids))
        np.testing.assert_allclose(ours.probs, reference.probs, atol=1e-5)
        for class_id, grid in reference.grids.items():
            np.testing.assert_allclose(ours.grids[class_id], grid, atol=1e-4)


class Blocking:
    """An eager network stand-in that waits for a signal (queue and deadline tests)."""

    layer = "features"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, pixels: np.ndarray, classes: list[int] | None = None, top_k: int = 1) -> object:
        self.calls += 1
        self.release.wait(10)
        return GradCam(TopRightOnly(), QUADRANT_SPEC)(pixels, classes, top_k)


async def test_the_queue_is_bounded_and_the_deadline_kept(photo_jpegs: dict[str, bytes]) -> None:
    network = Blocking()
    explainer = Explainer(queue_limit=2, max_pixels=10**8, opener=lambda target: network)
    target = Target(QUADRANT_SPEC, 1, None)
    far = time.monotonic() + 30
    first = asyncio.ensure_future(explainer.explain(target, photo_jpegs["chelsea"], far))
    second = asyncio.ensure_future(explainer.explain(target, photo_jpegs["coffee"], time.monotonic() + 0.3))
    await asyncio.sleep(0.1)
    with pytest.raises(Overloaded) as refused:
        await explainer.explain(target, photo_jpegs["rocket"], far)
    assert refused.value.headers["Retry-After"] == "2"
    with pytest.raises(DeadlineExceeded):
        await second
    network.release.set()
    assert (await first).maps[0].grid.shape == (56, 56)
    for _ in range(50):
        if explainer.pending == 0:
            break
        await asyncio.sleep(0.05)
    assert explainer.pending == 0 and network.calls == 1  # the late one was skipped, never run
    await explainer.close(1.0)


async def test_one_version_of_each_model_is_kept_open(photo_jpegs: dict[str, bytes]) -> None:
    """A version loaded in place of another (explicit model control) does not keep the old open."""
    opened: list[int] = []

    def opener(target: Target) -> GradCam:
        opened.append(target.version)
        return GradCam(TopRightOnly(), QUADRANT_SPEC)

    explainer = Explainer(queue_limit=1, max_pixels=10**8, opener=opener)
    far = time.monotonic() + 30
    for version in (1, 1, 2, 2, 1):
        await explainer.explain(Target(QUADRANT_SPEC, version, None), photo_jpegs["chelsea"], far)
    assert opened == [1, 2, 1]  # 1 opened again: opening 2 dropped it
    await explainer.close(1.0)


@pytest.fixture
async def explain_client(settings: Settings, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The API at normal explanation priority: at ``idle`` (the default, tested on its own above)
    an explanation waits for whatever else keeps the machine busy, such as another test run."""
    async for c in open_client(create_app(settings.model_copy(update={"explain_priority": "normal"}), engine=engine)):
        yield c


def png_of(answer: dict[str, object], index: int = 0) -> Image.Image:
    explanation = answer["explanations"][index]  # type: ignore[index]
    return Image.open(io.BytesIO(base64.b64decode(explanation["heatmap_png"])))


async def test_explain_answers_a_heatmap_of_the_uploads_own_size(explain_client: httpx.AsyncClient,
                                                                 photo_jpegs: dict[str, bytes]) -> None:
    jpeg = photo_jpegs["chelsea"]  # 451 x 300
    answer = await explain_client.post("/explain", files={"file": ("cat.jpg", jpeg, "image/jpeg")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    predicted = (await explain_client.post("/predict", files={"file": ("cat.jpg", jpeg)})).json()
    assert body["predictions"][0]["class_id"] == predicted["predictions"][0]["class_id"]
    assert body["explanations"][0]["class_id"] == predicted["predictions"][0]["class_id"]
    assert (body["image"]["width"], body["image"]["height"], body["layer"]) == (451, 300, "layer4")
    heatmap = png_of(body)
    assert (heatmap.size, heatmap.mode) == ((451, 300), "RGBA")
    left, top, right, bottom = (int(v) for v in body["crop_box"])
    alpha = np.asarray(heatmap)[..., 3]
    assert (alpha[:, : left - 1] == 0).all() and (alpha[:, right + 1 :] == 0).all() and (alpha[: top - 1] == 0).all()
    assert (alpha[top + 1 : bottom - 1, left + 1 : right - 1] == 255).all()
    assert np.asarray(body["explanations"][0]["grid"]).shape == (7, 7) and body["explain_time_ms"] > 0


async def test_png_and_exif_rotated_uploads(explain_client: httpx.AsyncClient, photos: dict[str, Image.Image]) -> None:
    png = encode(photos["coffee"], "PNG")
    answer = (await explain_client.post("/explain", params={"top_k": 2}, files={"file": ("c.png", png)})).json()
    assert [png_of(answer, i).size for i in range(2)] == [photos["coffee"].size] * 2
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rotated = as_jpeg(photos["chelsea"], exif=exif.tobytes())
    answer = (await explain_client.post("/explain", files={"file": ("r.jpg", rotated)})).json()
    assert png_of(answer).size == (300, 451) and (answer["image"]["width"], answer["image"]["height"]) == (300, 451)


async def test_accept_png_answers_the_overlay(explain_client: httpx.AsyncClient, photos: dict[str, Image.Image],
                                              photo_jpegs: dict[str, bytes]) -> None:
    answer = await explain_client.post("/explain", params={"class_id": 5}, headers={"Accept": "image/png"},
                                       files={"file": ("cat.jpg", photo_jpegs["chelsea"])})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(answer.content))
    assert (overlay.size, overlay.mode, answer.headers["X-Class-Id"]) == ((451, 300), "RGB", "5")
    photo = np.asarray(Image.open(io.BytesIO(photo_jpegs["chelsea"])).convert("RGB"), dtype=np.int16)
    difference = np.abs(np.asarray(overlay, dtype=np.int16) - photo).sum(-1)
    assert difference[:, :40].max() == 0 and difference[:, 100:350].mean() > 10  # outside the crop: the photo


async def test_bad_input_gets_the_same_errors_as_predict(explain_client: httpx.AsyncClient) -> None:
    cases = [{"files": {"file": ("e.jpg", b"")}}, {"files": {"file": ("t.jpg", b"just text, not a photo")}},
             {"files": {"other": ("x.jpg", b"x")}}, {"files": {"file": ("c.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 40)}}]
    for case in cases:
        explained = await explain_client.post("/explain", **case)  # type: ignore[arg-type]
        predicted = await explain_client.post("/predict", **case)  # type: ignore[arg-type]
        assert explained.status_code == predicted.status_code and explained.status_code in (400, 415, 422)
        assert explained.json()["error"]["code"] == predicted.json()["error"]["code"]
    for params in ({"class_id": 1000}, {"top_k": 6}, {"class_id": -1}):
        answer = await explain_client.post("/explain", params=params, files={"file": ("x.jpg", b"x")})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_parameter"
    missing = await explain_client.post("/explain", params={"model": "nope"}, files={"file": ("x.jpg", b"x")})
    assert missing.status_code == 404


async def test_a_full_explainer_answers_503_and_predictions_go_on(settings: Settings, engine: Engine,
                                                                  photo_jpegs: dict[str, bytes]) -> None:
    app = create_app(settings, engine=engine)
    network = Blocking()
    async for c in open_client(app):
        app.state.service.explainer = Explainer(queue_limit=1, max_pixels=10**8, opener=lambda t: network)
        running = asyncio.ensure_future(c.post("/explain", files={"file": ("a.jpg", photo_jpegs["chelsea"])}))
        await asyncio.sleep(0.2)
        refused = await c.post("/explain", files={"file": ("b.jpg", photo_jpegs["coffee"])})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "2"
        assert refused.json()["error"]["code"] == "overloaded"
        assert (await c.post("/predict", files={"file": ("c.jpg", photo_jpegs["rocket"])})).status_code == 200
        network.release.set()
        assert (await running).status_code == 200


async def test_each_served_model_is_explained_with_its_own_labels(user_repository: Path,
                                                                  photo_jpegs: dict[str, bytes]) -> None:
    settings = Settings(model_repository=user_repository, runtime="onnxruntime", compiled_cache=False,
                        explain_priority="normal")
    async for c in open_client(create_app(settings)):
        await until_ready(c)
        answer = (await c.post("/explain", params={"model": "parts", "lang": "zh"},
                               files={"file": ("a.jpg", photo_jpegs["horse"])})).json()
        assert answer["model"] == "parts" and answer["layer"] == "features"
        assert answer["explanations"][0]["label_en"] in ("bolt", "nut", "washer")


async def test_the_protocol_explains_in_its_own_tensors_and_errors(explain_client: httpx.AsyncClient,
                                                                   photo_jpegs: dict[str, bytes]) -> None:
    image = base64.b64encode(photo_jpegs["chelsea"]).decode()
    body = {"id": "why", "parameters": {"top_k": 2},
            "inputs": [{"name": "INPUT", "shape": [1], "datatype": "BYTES", "data": [image]}]}
    answer = await explain_client.post("/v2/models/resnet18/versions/1/explain", json=body)
    assert answer.status_code == 200, answer.text
    tensors = {o["name"]: o for o in answer.json()["outputs"]}
    assert answer.json()["id"] == "why" and set(tensors) == {"class_ids", "confidences", "heatmaps", "grids"}
    ours = (await explain_client.post("/explain", params={"top_k": 2}, files={"file": ("c.jpg", photo_jpegs["chelsea"])})).json()
    assert tensors["class_ids"]["data"] == [e["class_id"] for e in ours["explanations"]]
    assert tensors["grids"]["shape"] == [2, 7, 7] and tensors["heatmaps"]["shape"] == [2]
    heatmap = Image.open(io.BytesIO(base64.b64decode(tensors["heatmaps"]["data"][1])))
    assert heatmap.size == (451, 300)
    wrong = await explain_client.post("/v2/models/resnet18/explain", json={**body, "parameters": {"class_id": 5000}})
    assert wrong.status_code == 422 and "out of range" in wrong.json()["error"]
    two = {**body, "inputs": [{**body["inputs"][0], "shape": [2], "data": [image, image]}]}  # type: ignore[index]
    refused = await explain_client.post("/v2/models/resnet18/explain", json=two)
    assert refused.status_code == 400 and "one encoded image" in refused.json()["error"]


@pytest.mark.parametrize(("priority", "policy", "nice"), [("idle", "SCHED_IDLE", 0), ("low", "SCHED_OTHER", 19),
                                                          ("normal", "SCHED_OTHER", 0)])
async def test_explanations_run_at_the_configured_cpu_priority(priority: str, policy: str, nice: int,
                                                               photo_jpegs: dict[str, bytes]) -> None:
    seen: list[tuple[int, int]] = []

    def opener(target: Target) -> GradCam:
        tid = threading.get_native_id()
        seen.append((os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)))
        return GradCam(TopRightOnly(), QUADRANT_SPEC)

    explainer = Explainer(queue_limit=1, max_pixels=10**8, priority=priority, opener=opener)
    await explainer.explain(Target(QUADRANT_SPEC, 1, None), photo_jpegs["coffee"], time.monotonic() + 30)
    await explainer.close(1.0)
    assert seen == [(getattr(os, policy), nice)]
