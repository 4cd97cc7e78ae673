"""Settings come from RESNET_SERVE_* variables, with clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from resnet_serve.settings import Settings, unknown_variables


def test_defaults_match_the_documented_design() -> None:
    s = Settings()
    assert (s.max_batch_size, s.max_wait_ms, s.dispatch) == (4, 50.0, "eager")
    assert (s.request_timeout_s, s.max_upload_mb, s.weights_mode) == (5.0, 10.0, "auto")
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert s.queue_limit() == 64  # before the model has been timed


def test_the_queue_limit_follows_the_measured_batch_time_and_the_deadline() -> None:
    s = Settings(request_timeout_s=5, max_batch_size=4)
    assert s.queue_limit(batch_ms=125.0) == 80  # 2.5 s / 125 ms = 20 batches of 4
    assert s.queue_limit(batch_ms=10_000.0) == 4  # never below one batch
    assert s.queue_limit(batch_ms=0.001) == 4096  # and bounded above
    assert Settings(max_queue=7).queue_limit(batch_ms=125.0) == 7
    assert s.queue_limit(batch_ms=125.0, instances=2) == 160  # two batches at once: twice the work in time
    assert Settings(max_queue=7).queue_limit(batch_ms=125.0, instances=2) == 7


def test_cors_origins_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings().cors_origins == ["https://a.example", "https://b.example"]
    assert Settings(api_key="s3cret").api_key.get_secret_value() == "s3cret"  # type: ignore[union-attr]
    assert "s3cret" not in repr(Settings(api_key="s3cret"))


def test_values_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("RESNET_SERVE_DISPATCH", "wait")
    monkeypatch.setenv("RESNET_SERVE_WEIGHTS", "/models/r18.pth")
    monkeypatch.setenv("RESNET_SERVE_MAX_QUEUE", "5")
    s = Settings()
    assert (s.max_batch_size, s.dispatch, s.weights, s.queue_limit()) == (8, "wait", Path("/models/r18.pth"), 5)


@pytest.mark.parametrize(
    ("name", "value"),
    [("RESNET_SERVE_DEVICE", "tpu"), ("RESNET_SERVE_MAX_BATCH_SIZE", "0"), ("RESNET_SERVE_DISPATCH", "now")],
)
def test_a_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    assert name.removeprefix("RESNET_SERVE_").lower() in str(error.value)


def test_an_empty_variable_is_an_unset_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL_REPOSITORY", "MAX_BATCH_SIZE", "PRECISION", "API_KEY", "CORS_ORIGINS"):
        monkeypatch.setenv(f"RESNET_SERVE_{name}", "")
    s = Settings()
    assert (s.model_repository, s.max_batch_size, s.precision, s.api_key, s.cors_origins) == (None, 4, "auto", None, [])


def test_a_misspelt_variable_is_named_with_the_setting_it_resembles() -> None:
    environ = {"RESNET_SERVE_BATCH_SIZE": "8", "RESNET_SERVE_DEVCE": "cpu", "RESNET_SERVE_PORT": "9000",
               "RESNET_SERVE_ZZZ": "1", "RESNET_SERVE_BENCH_IMAGES": "64", "PATH": "/bin"}
    assert unknown_variables(environ) == [
        "RESNET_SERVE_BATCH_SIZE is not a setting and is ignored (did you mean RESNET_SERVE_MAX_BATCH_SIZE?)",
        "RESNET_SERVE_DEVCE is not a setting and is ignored (did you mean RESNET_SERVE_DEVICE?)",
        "RESNET_SERVE_ZZZ is not a setting and is ignored",
    ]  # a setting, a benchmark's variable and any other variable pass without a word
