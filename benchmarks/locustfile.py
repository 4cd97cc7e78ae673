"""Locust load test: each simulated user uploads real photos to POST /predict, back to back.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 32 -r 8 -t 60s --csv benchmarks/results/locust

Set RESNET_SERVE_BENCH_IMAGES to a folder of JPEG/PNG files to use your own images. Every upload
gets a random trailer (decoders ignore it) so the result cache never answers; set
RESNET_SERVE_BENCH_REPEAT=1 to send the same bytes and measure the cache instead.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from locust import HttpUser, constant, task

sys.path.insert(0, str(Path(__file__).parent))
from images import default_images, folder_images  # noqa: E402

_folder = os.environ.get("RESNET_SERVE_BENCH_IMAGES")
IMAGES = folder_images(Path(_folder)) if _folder else default_images()
REPEAT = os.environ.get("RESNET_SERVE_BENCH_REPEAT") == "1"


class Uploader(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self._images = itertools.cycle(IMAGES)

    @task
    def predict(self) -> None:
        data = next(self._images) if REPEAT else next(self._images) + os.urandom(16)
        with self.client.post("/predict", files={"file": ("photo.jpg", data, "image/jpeg")},
                              name="/predict", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif not response.json().get("predictions"):
                response.failure("no predictions in the answer")
