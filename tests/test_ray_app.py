"""The Ray Serve application on a local single-node Ray cluster, through Ray's HTTP proxy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from resnet_serve.inference import Engine
from tests.conftest import free_port, probs_of


@pytest.fixture(scope="module")
def ray_url(seeded_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from resnet_serve.ray_app import build_app

    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        # Ray's controller gives its HTTP proxy 5 s to start and 10 s per health check; on a busy
        # 2-core CI host that is not always enough, and it then kills the proxy mid-setup.
        for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
            env.setenv(name, "60")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            overrides = {"weights": str(seeded_weights), "allow_download": False, "torch_threads": 1,
                         "compiled_cache": False, "max_batch_size": 4, "explain_priority": "normal"}
            serve.run(build_app(overrides), name="resnet-serve", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def test_predictions_through_rays_proxy_match_the_engine(ray_url: str, photo_jpegs: dict[str, bytes],
                                                          engine: Engine) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=ray_url, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/predict?top_k=3", files={"file": (f"{n}.jpg", photo_jpegs[n], "image/jpeg")})
                for n in photo_jpegs))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for name, response in zip(photo_jpegs, responses):
        body = response.json()
        assert body["weights"] == "custom" and body["model"] == "resnet18"
        expected = asyncio.run(probs_of(engine, [photo_jpegs[name]]))
        assert [p["class_id"] for p in body["predictions"]] == expected[0].topk(3).indices.tolist()
    assert max(r.json()["batch_size"] for r in responses) > 1  # the replica's batcher grouped them
    assert httpx.get(f"{ray_url}/health/ready").json()["status"] == "ready"


def test_explanations_behind_ray(ray_url: str, photo_jpegs: dict[str, bytes]) -> None:
    answer = httpx.post(f"{ray_url}/explain", files={"file": ("c.jpg", photo_jpegs["chelsea"], "image/jpeg")},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["method"] == "grad-cam" and answer.json()["image"]["width"] == 451


def test_errors_keep_our_json_shape_behind_ray(ray_url: str) -> None:
    response = httpx.post(f"{ray_url}/predict", files={"file": ("a.txt", b"not an image", "text/plain")})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_the_serve_config_names_this_application() -> None:
    config = yaml.safe_load((Path(__file__).parent.parent / "deploy" / "ray" / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "resnet_serve.ray_app:app"
    (deployment,) = application["deployments"]
    assert deployment["name"] == "ResnetServe" and deployment["autoscaling_config"]["max_replicas"] >= 2
