"""The benchmark scripts run and report correctly (their timings are not asserted here)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import http_bench  # noqa: E402
import soak  # noqa: E402


@pytest.fixture(scope="module")
def server_url(seeded_weights: Path) -> Iterator[str]:
    env = {"RESNET_SERVE_WEIGHTS": str(seeded_weights), "RESNET_SERVE_ALLOW_DOWNLOAD": "false"}
    with http_bench.spawned_server(env) as (url, _):
        yield url


def test_http_bench_writes_a_table_and_json(server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(http_bench, "RESULTS", tmp_path)
    code = http_bench.main(["--url", server_url, "--concurrency", "1", "4", "--duration", "1.5",
                            "--warmup", "0.5", "--baseline-repeats", "0", "--out", "t"])
    assert code == 0
    report = json.loads((tmp_path / "t.json").read_text())
    results = report["results"]
    assert [r["concurrency"] for r in results] == [1, 4]
    assert all(set(r["statuses"]) == {"200"} and r["requests"] > 0 for r in results)
    assert all(r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] for r in results)
    assert report["server"]["weights"] == "custom"
    assert "| 4 |" in capsys.readouterr().out


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert http_bench.percentile(values, 50) == 51.0
    assert http_bench.percentile(values, 99) == 100.0


def test_the_locustfile_drives_the_service_headless(server_url: str, tmp_path: Path) -> None:
    locust = Path(sys.executable).parent / "locust"
    result = subprocess.run(
        [str(locust), "-f", str(BENCHMARKS / "locustfile.py"), "--host", server_url, "--headless",
         "-u", "4", "-r", "4", "-t", "4s", "--csv", str(tmp_path / "run"), "--only-summary"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with (tmp_path / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["/predict"]["Request Count"]) > 0
    assert int(rows["/predict"]["Failure Count"]) == 0


def test_soak_mixes_good_and_bad_traffic_and_reports_memory(server_url: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(soak, "RESULTS", tmp_path)
    code = soak.main(["--url", server_url, "--duration", "3", "--concurrency", "4", "--bad", "0.5", "--out", "s"])
    report = json.loads((tmp_path / "s.json").read_text())
    assert code == 0, report
    statuses = report["statuses"]
    assert statuses.get("good 200", 0) > 0
    assert {k.split()[1] for k in statuses if k.startswith("bad")} <= {"400", "413", "415"}
    assert report["good_p50_ms"] <= report["good_p99_ms"]
