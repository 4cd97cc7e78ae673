"""resnet-serve on Ray Serve, for more than one machine (the ``ray`` extra).

Each replica runs the same ``Service`` and the same routes as the single-process server (the
predict, explain, model and health routers): the same repository of models, each with its pipeline,
result cache, admission control, deadlines and dynamic batcher, configured from ``Settings``. Ray provides
the replicas, the HTTP proxy, routing between replicas and autoscaling.

    serve run resnet_serve.ray_app:app                     # one replica, local Ray
    serve deploy deploy/ray/serve_config.yaml              # replicas and autoscaling from YAML

Replicas read their settings from ``RESNET_SERVE_*`` in their environment (``runtime_env`` in
the Serve config), or from overrides given to ``build_app``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from resnet_serve.http import explain, health, info, predict
from resnet_serve.http.dependencies import get_service
from resnet_serve.http.errors import install_error_handlers
from resnet_serve.service import Service
from resnet_serve.settings import Settings

api = FastAPI(title="resnet-serve on Ray Serve")
install_error_handlers(api)
for _router in (predict.router, explain.router, info.router, health.router):
    api.include_router(_router)


async def _replica_service() -> Service:
    """Ray runs its own copy of ``api`` in each replica, so the routes find the service through
    the replica that serves them rather than through the app's state."""
    return serve.get_replica_context().servable_object.service  # type: ignore[no-any-return]


api.dependency_overrides[get_service] = _replica_service


@serve.deployment(
    name="ResnetServe",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
)
@serve.ingress(api)
class ResnetServe:
    """One replica: a loaded, warmed service behind the shared routes."""

    async def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.service = Service(Settings(**(overrides or {})))
        await self.service.start()
        await self.service.loaded()

    def check_health(self) -> None:
        """Ray's own health check: a replica whose model is not serving is replaced."""
        status = self.service.readiness()
        if status not in ("ready", "restarting"):
            raise RuntimeError(f"the service is {status}")


def build_app(overrides: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application, with settings overrides for every replica."""
    return ResnetServe.bind(overrides)


app = build_app()
