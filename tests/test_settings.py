"""Settings come from RESNET_SERVE_* variables, with clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from resnet_serve.settings import Settings


def test_defaults_match_the_documented_design() -> None:
    s = Settings()
    assert (s.max_batch_size, s.max_wait_ms, s.dispatch) == (4, 50.0, "eager")
    assert (s.request_timeout_s, s.max_upload_mb, s.weights_mode) == (5.0, 10.0, "auto")
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert s.queue_limit == 64


def test_values_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("RESNET_SERVE_DISPATCH", "wait")
    monkeypatch.setenv("RESNET_SERVE_WEIGHTS", "/models/r18.pth")
    monkeypatch.setenv("RESNET_SERVE_MAX_QUEUE", "5")
    s = Settings()
    assert (s.max_batch_size, s.dispatch, s.weights, s.queue_limit) == (8, "wait", Path("/models/r18.pth"), 5)


@pytest.mark.parametrize(
    ("name", "value"),
    [("RESNET_SERVE_DEVICE", "tpu"), ("RESNET_SERVE_MAX_BATCH_SIZE", "0"), ("RESNET_SERVE_DISPATCH", "now")],
)
def test_a_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    assert name.removeprefix("RESNET_SERVE_").lower() in str(error.value)
