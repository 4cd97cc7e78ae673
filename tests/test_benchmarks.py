"""The benchmark scripts run and report correctly (their timings are not asserted here)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from resnet_serve.settings import Settings

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bulk_bench  # noqa: E402
import burst  # noqa: E402
import cam_output_bench  # noqa: E402
import engine_bench  # noqa: E402
import explain_bench  # noqa: E402
import http_bench  # noqa: E402
import install_bench  # noqa: E402
import memory_bench  # noqa: E402
import multi_model_bench  # noqa: E402
import ort_int8_bench  # noqa: E402
import ort_session_bench  # noqa: E402
import soak  # noqa: E402
import stages_bench  # noqa: E402
import start_bench  # noqa: E402


@pytest.fixture
def offline_weights(seeded_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Benchmarks that load the model in-process use the seeded weights, never a download."""
    monkeypatch.setenv("RESNET_SERVE_WEIGHTS", str(seeded_weights))
    monkeypatch.setenv("RESNET_SERVE_ALLOW_DOWNLOAD", "false")


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
    (runs,) = report["rounds"]
    results = runs["env"]["results"]
    assert [r["concurrency"] for r in results] == [1, 4]
    assert all(set(r["statuses"]) == {"200"} and r["requests"] > 0 for r in results)
    assert all(r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] for r in results)
    assert runs["env"]["server"]["weights"] == "custom"
    assert report["machine"]["cpus"] >= 1 and isinstance(report["machine"]["isa"], list)
    assert "| 4 |" in capsys.readouterr().out
    assert http_bench.main(["--url", server_url, "--concurrency", "2", "--duration", "1", "--warmup", "0.2",
                            "--baseline-repeats", "0", "--client", "httpx", "--rounds", "2", "--out", "h"]) == 0
    rounds = json.loads((tmp_path / "h.json").read_text())["rounds"]
    assert len(rounds) == 2 and all(set(r["env"]["results"][0]["statuses"]) == {"200"} for r in rounds)
    assert "### Median of 2 rounds" in (tmp_path / "h.md").read_text()


def test_the_readiness_probe_reads_the_status(server_url: str) -> None:
    assert http_bench.is_ready(server_url)
    assert not http_bench.is_ready(f"http://127.0.0.1:{http_bench.free_port()}")  # nothing listens

    class Loading(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Loading) as loading:
        threading.Thread(target=loading.serve_forever, daemon=True).start()
        assert not http_bench.is_ready(f"http://127.0.0.1:{loading.server_address[1]}")
        loading.shutdown()


def test_http_bench_compares_onnx_runtime_threads_sleeping_and_spinning() -> None:
    assert http_bench.CONFIGS["ort-int8"]["RESNET_SERVE_ORT_SPINNING"] == "false"
    assert http_bench.CONFIGS["ort-fp32-spinning"]["RESNET_SERVE_ORT_SPINNING"] == "true"
    assert http_bench.CONFIGS["naive"]["RESNET_SERVE_RUNTIME"] == http_bench.CONFIGS["fastest"]["RESNET_SERVE_RUNTIME"] \
        == "torchscript"  # their settings are TorchScript's: never left to RUNTIME=auto
    Settings(**{k.removeprefix("RESNET_SERVE_").lower(): v for k, v in http_bench.CONFIGS["ort-int8-spinning"].items()})

    def run(*rps: float) -> dict[str, object]:
        return {"results": [{"concurrency": c, "throughput_rps": r} for c, r in zip((1, 32), rps)]}

    runs = {"ort-int8": run(80, 120), "ort-int8-spinning": run(81, 100), "ort-fp32": run(40, 50)}
    assert http_bench.ratios(runs) == {"ort-int8_sleeping_vs_spinning_throughput": 1.2}


def test_http_bench_compares_int8_on_each_runtime_against_torchscript() -> None:
    runtimes = {name: http_bench.CONFIGS[name]["RESNET_SERVE_RUNTIME"] for name in ("ts-int8", "ort-int8", "ov-int8")}
    assert runtimes == {"ts-int8": "torchscript", "ort-int8": "onnxruntime", "ov-int8": "openvino"}
    assert all(http_bench.CONFIGS[name]["RESNET_SERVE_PRECISION"] == "int8" for name in runtimes)

    def run(rps: float) -> dict[str, object]:
        return {"results": [{"concurrency": 32, "throughput_rps": rps}]}

    assert http_bench.ratios({"ts-int8": run(100), "ort-int8": run(90), "ov-int8": run(150)}) == {
        "ort-int8_vs_ts-int8_throughput": 0.9, "ov-int8_vs_ts-int8_throughput": 1.5}


def test_the_slim_config_is_served_by_the_torch_free_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12 compares the slim install's server with TorchScript's: in interleaved rounds the
    slim config runs under the torch-free virtualenv's python, every other one under this one."""
    started: dict[str, str] = {}

    @contextlib.contextmanager
    def spawned(env: dict[str, str], python: str = sys.executable) -> Iterator[tuple[str, None]]:
        started[env.get("RESNET_SERVE_RUNTIME", "")] = str(python)
        yield "http://127.0.0.1:9", None

    async def load(url: str, images: list[bytes], concurrency: int, *rest: object) -> http_bench.LoadResult:
        return http_bench.LoadResult(concurrency, 1.0, 10, 10.0, 1.0, 1.0, 1.0, {"200": 10}, 4.0)

    monkeypatch.setattr(http_bench, "spawned_server", spawned)
    monkeypatch.setattr(http_bench, "torch_free_python", lambda: Path("/slim/bin/python"))
    http_bench.slim_python.cache_clear()
    monkeypatch.setattr(http_bench, "run_load", load)
    monkeypatch.setattr(http_bench.httpx, "get", lambda *a, **k: httpx.Response(200, json={"runtime": "x"}))
    args = argparse.Namespace(configs=["ts-int8", "slim-ort-int8"], baseline_repeats=0, spawn=True, url=None,
                              concurrency=[32], warmup=0, duration=1, repeat=False, client="raw")
    runs = http_bench.measure_round(args, [b"jpeg"])
    assert started == {"torchscript": sys.executable, "onnxruntime": "/slim/bin/python"}
    assert set(http_bench.ratios(runs)) == {"slim-ort-int8_vs_ts-int8_throughput"}


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
    assert report["machine"]["cpus"] == os.cpu_count()


def test_accuracy_counts_top1_and_top5_on_a_class_folder(
    tmp_path: Path, photo_jpegs: dict[str, bytes], engine: object, offline_weights: None,
) -> None:
    import accuracy

    from resnet_serve.results import top_k
    from resnet_serve.spec import RESNET18
    from resnet_serve.transform import preprocess

    names = list(photo_jpegs)
    predictions = asyncio.run(engine.predict(  # type: ignore[attr-defined]
        [preprocess(photo_jpegs[n], RESNET18, max_pixels=10**9).pixels for n in names]))
    data = tmp_path / "val"
    expected_top1 = expected_top5 = 0
    for i, (name, prediction) in enumerate(zip(names, predictions)):
        best = top_k(prediction.probs, 5)[1]
        label = best[0] if i % 2 == 0 else (best[0] + 500) % 1000  # half labelled as the model says
        expected_top1 += label == best[0]
        expected_top5 += label in best
        folder = data / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(photo_jpegs[name])
    assert accuracy.main(["--data", str(data), "--precisions", "fp32", "--batch-size", "4",
                          "--results-dir", str(tmp_path / "out")]) == 0
    (row,) = json.loads((tmp_path / "out" / "accuracy.json").read_text())["results"]
    assert row["images"] == len(names) and row["weights"] == "custom"
    assert row["top1"] == pytest.approx(100 * expected_top1 / len(names), abs=1e-3)
    assert row["top5"] == pytest.approx(100 * expected_top5 / len(names), abs=1e-3)


def test_accuracy_refuses_an_incomplete_set_of_wordnet_folders(tmp_path: Path) -> None:
    import accuracy

    (tmp_path / "n01440764").mkdir()
    with pytest.raises(SystemExit, match="all 1000"):
        accuracy.labelled_files(tmp_path)


def test_ratios_compare_configurations_from_one_run() -> None:
    def run(rps1: float, rps32: float, p50: float, single: float, batched: float) -> dict[str, object]:
        return {"in_process": {"total_p50_ms": single, "batched_images_per_s": batched},
                "results": [{"concurrency": 1, "throughput_rps": rps1, "p50_ms": p50},
                            {"concurrency": 32, "throughput_rps": rps32, "p50_ms": 900.0}]}

    summary = http_bench.ratios({"naive": run(20, 25, 50, 40, 26), "fastest": run(60, 100, 15, 12, 110)})
    assert summary["fastest_vs_naive_throughput"] == 4.0
    assert summary["fastest_server_vs_in_process_throughput"] == 0.91
    assert summary["fastest_c1_p50_vs_in_process_single"] == 1.25


def test_ratios_over_rounds_are_medians() -> None:
    rounds = [{"fastest_vs_naive_throughput": v} for v in (3.9, 4.6, 4.4)]
    assert http_bench.median_ratios(rounds) == {"fastest_vs_naive_throughput": 4.4}


def test_the_median_table_takes_each_figure_over_rounds() -> None:
    def run(rps: float, single: float) -> dict[str, dict[str, object]]:
        result = {"concurrency": 32, "throughput_rps": rps, "p50_ms": 1000 / rps, "p99_ms": 2000 / rps,
                  "mean_batch_size": 8.0}
        return {"fastest": {"in_process": {"total_p50_ms": single, "batched_images_per_s": 100.0},
                            "results": [result]}}

    table = http_bench.median_table([run(100, 12), run(80, 10), run(120, 11)])
    assert table.splitlines()[-1] == "| fastest | 32 | 100 | 10.0 | 20.0 | 8.0 | 11 | 100.0 |"


def test_engine_bench_writes_a_table_json_and_plot(tmp_path: Path, offline_weights: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_bench, "RESULTS", tmp_path)
    assert engine_bench.main(["--configs", "fp32", "int8-x86", "--batch-sizes", "1", "2", "--repeats", "2",
                              "--out", "e"]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    fp32, int8 = report["configs"]["fp32"], report["configs"]["int8-x86"]
    assert [r["batch_size"] for r in fp32["results"]] == [1, 2]
    assert all(r["first_ms"] > 0 for r in fp32["results"])  # what a request pays for a new shape
    assert fp32["weights"] == "custom" and fp32["warm_from"] == "repository" and int8["precision"] == "int8"
    assert fp32["runtime"] == int8["runtime"] == "torchscript"  # pinned: RUNTIME=auto could choose ONNX Runtime
    assert int8["model_file_mb"] < fp32["model_file_mb"]  # INT8 weights take a quarter of the bytes
    assert 0 <= int8["agreement"]["top1_agreement"] <= 1
    assert "| int8-x86 |" in (tmp_path / "e.md").read_text() and "First call at each batch size" in (tmp_path / "e.md").read_text()
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_stages_bench_times_each_stage_against_its_alternative(tmp_path: Path, offline_weights: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages_bench, "RESULTS", tmp_path)
    assert stages_bench.main(["--repeats", "4", "--precision", "fp32", "--out", "s"]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    stages = [r["stage"] for r in rows]
    assert stages[:2] == ["resize + crop"] * 2 and stages[-3:] == ["fp32 batch 1"] * 3
    assert all(r["ms"] > 0 for r in rows)
    assert "| fp32 batch 1 | Engine.predict on one event loop (server) |" in (tmp_path / "s.md").read_text()


def test_burst_reports_only_200s_and_503s(tmp_path: Path, offline_weights: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(burst, "RESULTS", tmp_path)
    assert burst.main(["--requests", "60", "--max-queue", "2", "--out", "b"]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["statuses"]) == {"200", "503"} and sum(report["statuses"].values()) == 60
    assert report["rss_mb_before"] > 0 and report["rss_mb_after"] > 0
    assert report["machine"]["cpus"] == os.cpu_count()


def test_multi_model_bench_puts_each_model_mixed_next_to_alone(user_repository: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multi_model_bench, "RESULTS", tmp_path)
    assert multi_model_bench.main(["--repository", str(user_repository), "--models", "flowers", "parts",
                                   "--concurrency", "2", "--duration", "1.5", "--warmup", "0.3", "--out", "m"]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    for run in ("alone", "mixed"):
        assert set(report[run]) == {"flowers", "parts"}
        assert all(r["rps"] > 0 and set(r["statuses"]) == {"200"} for r in report[run].values())
    assert "| flowers |" in (tmp_path / "m.md").read_text() and report["machine"]["cpus"] >= 1


def test_memory_bench_reports_memory_start_and_speed_per_install(slim_python: Path, openvino_python: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_bench, "RESULTS", tmp_path)
    configurations = ["slim onnxruntime fp32", "slim+openvino openvino fp32", "full torchscript fp32", "full auto fp32",
                      "slim+openvino openvino bf16"]
    assert memory_bench.main(["--duration", "1", "--concurrency", "2", "--precisions", "fp32", "bf16", "--slim-python",
                              str(slim_python), "--openvino-python", str(openvino_python), "--starts", "2",
                              "--explain", "--only", *configurations, "--out", "mem"]) == 0
    report = json.loads((tmp_path / "mem.json").read_text())["configurations"]
    assert list(report) == configurations  # in the order asked (the table's own order differs)
    assert report["slim onnxruntime fp32"]["runtime"] == "onnxruntime"
    assert report["slim+openvino openvino fp32"]["runtime"] == "openvino"
    assert report["full torchscript fp32"]["runtime"] == "torchscript"
    assert report["full auto fp32"]["runtime"] in {"torchscript", "onnxruntime", "openvino"}
    bf16 = report["slim+openvino openvino bf16"]
    assert bf16["runtime"] == "openvino" and bf16["precision"] in {"bf16", "fp32"}  # fp32: a CPU without AVX-512
    for row in report.values():
        assert 0 < row["idle_rss_mb"] <= row["peak_rss_mb"] and row["rps"] > 0 and row["first_start_rss_mb"] > 0
        assert row["explain_method"] == "cam" and row["explain_rss_mb"] > 0  # no eager weights exported: CAM
        starts = row["start_to_ready_all_s"]
        assert len(starts) == 2 and 0 < min(starts) <= row["start_to_ready_s"] <= max(starts)
    assert (tmp_path / "mem.png").read_bytes()[:4] == b"\x89PNG"


def test_start_bench_times_starts_imports_and_loading(slim_python: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(start_bench, "RESULTS", tmp_path)
    assert start_bench.main(["--rounds", "2", "--tree", f"again={start_bench.THIS}", "--httpx-probe",
                             "--slim-python", str(slim_python), "--out", "start"]) == 0
    report = json.loads((tmp_path / "start.json").read_text())
    assert set(report["starts_s"]) == {"this", "again", "this, polled by httpx.get every 20 ms"}
    assert set(report["imports_s"]) == set(start_bench.IMPORTS)
    for table in ("starts_s", "imports_s"):
        for row in report[table].values():
            assert len(row["all"]) == 2 and 0 < min(row["all"]) <= row["median"] <= max(row["all"])
    load = report["load_ms"]
    for row in ("SHA-256 of the artefact", "warm every size 1-4", "warm the largest only", "warm batch 1 only (the server)",
                "open the kept graph, weights mapped (the server)", "open the kept graph, weights inside (before)"):
        assert load[row]["median"] > 0
    assert {f"then batch {n}'s first call, more" for n in range(2, 5)} | {"no warm-up: batch 4's first call, more"} <= set(load)
    assert set(report["workers_pss_mb"]) == {"this", "again"}
    assert all(row["median"] > 30 for row in report["workers_pss_mb"].values())  # two servers' worth, at least
    assert "| again |" in (tmp_path / "start.md").read_text()
    with pytest.raises(SystemExit):
        start_bench.main(["--tree", f"nothing={tmp_path}"])


def test_bulk_bench_compares_offline_server_and_in_process(tmp_path: Path, offline_weights: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk_bench, "RESULTS", tmp_path)
    assert bulk_bench.main(["--images", "24", "--small", "8", "--runtime", "torchscript", "--concurrency", "4",
                            "--out", "bulk"]) == 0
    report = json.loads((tmp_path / "bulk.json").read_text())
    assert set(report["runs"]) == {"offline, small", "offline", "server"}
    assert all(run["code"] == 0 and run["images_per_s"] > 0 for run in report["runs"].values())
    assert report["runs"]["offline"]["peak_rss_mb"] > 0 and report["in_process_images_per_s"] > 0
    assert set(report["ratios"]) == {"offline_vs_in_process", "server_vs_offline", "rss_growth_mb"}


def test_ort_int8_bench_times_each_scheme_against_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_int8_bench, "RESULTS", tmp_path)
    assert ort_int8_bench.main(["--repeats", "1", "--out", "o"]) == 0
    report = json.loads((tmp_path / "o.json").read_text())
    rows = report["rows"]
    same = ["u8s8 reduced", ort_int8_bench.STEM_AS_IS, "export's + GEMM patch (served so on AMX)",
            "GEMM patch, every convolution"]
    assert set(rows) == {"fp32", "u8s8", ort_int8_bench.EXPORTS, "s8s8", "u8u8 (weights zero point 128)", *same}
    assert rows["fp32"]["max_abs_diff"] == 0 and all(r["b4_ms"] > 0 and r["b8_ms"] > 0 for r in rows.values())
    export = rows[ort_int8_bench.EXPORTS]
    for name in same:  # the same weights and zero points, other kernels or stem: the same answers
        assert rows[name]["top1_agreement"] == export["top1_agreement"]
        assert abs(rows[name]["max_abs_diff"] - export["max_abs_diff"]) < 5e-3
        assert rows[name]["max_abs_diff_vs_export"] < 1e-5
    assert "| s8s8 |" in (tmp_path / "o.md").read_text() and report["machine"]["cpus"] >= 1
    assert report["matmulinteger_u8s8_1thread_gmacs"] > 0


def test_ort_int8_bench_denies_amx_to_its_process_only_when_asked() -> None:
    """``--deny-amx``: the kernel refuses the process AMX permission (and only that), and the
    ONNX Runtime backend sees AMX as unusable, as on a CPU without it."""
    probe = "\n".join([
        "import ctypes, sys",
        "sys.path.insert(0, 'benchmarks')",
        "import ort_int8_bench",
        "from resnet_serve.backends import ARCH_GET_XCOMP_PERM, SYS_ARCH_PRCTL, amx_usable",
        "libc, mask = ctypes.CDLL(None, use_errno=True), ctypes.c_ulong()",
        "before = libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask))",
        "ort_int8_bench.deny_amx()",
        "after = libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask))",
        "print(before, after, ctypes.get_errno() == 1, amx_usable())",
    ])
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).parent.parent).stdout.split()
    # asking is allowed before, refused with EPERM after; and the server would not patch for AMX then
    assert out == ["0", "-1", "True", "False"]


def test_ort_session_bench_serves_every_batch_size_with_memory_patterns_on_and_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort_session_bench, "RESULTS", tmp_path)
    assert ort_session_bench.main(["--rounds", "1", "--max-batch", "2", "--out", "o"]) == 0
    report = json.loads((tmp_path / "o.json").read_text())
    assert set(report["rows"]) == {f"{g} mem_pattern {s}" for g in ("fp32", "int8") for s in ("on", "off")}
    for row in report["rows"].values():
        assert row["peak_mb"] >= row["after_every_size_mb"] > 50 and set(row) >= {"b1_ms", "b2_ms"}
    rows = report["rows"]
    assert rows["fp32 mem_pattern on"]["opened_mb"] > rows["int8 mem_pattern on"]["opened_mb"]  # 4x the weights
    assert "machine:" in (tmp_path / "o.md").read_text()


def test_explain_bench_times_explanations_and_predictions_beside_them(tmp_path: Path, offline_weights: None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(explain_bench, "RESULTS", tmp_path)
    assert explain_bench.main(["--duration", "1.5", "--concurrency", "2", "--explanations", "2", "--out", "x"]) == 0
    report = json.loads((tmp_path / "x.json").read_text())
    assert report["explanation"]["count"] == 2 and report["explanation"]["p50_ms"] > 0
    assert report["predict_alone"]["throughput_rps"] > 0 and report["predict_alongside"]["throughput_rps"] > 0
    assert report["explanations_alongside"].get("200", 0) >= 1 and report["p50_ratio"] > 0
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG" and "| /predict c=2 alone |" in (tmp_path / "x.md").read_text()


def test_cam_output_bench_times_graphs_with_and_without_features(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cam_output_bench, "RESULTS", tmp_path)
    assert cam_output_bench.main(["--rounds", "1", "--repeats", "2", "--out", "c"]) == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert set(rows) == {f"{p} {w} features" for p in ("fp32", "int8") for w in ("with", "without")}
    assert all(row["b1_ms"] > 0 and row["b4_ms"] > 0 for row in rows.values())


def test_install_bench_sizes_a_fresh_slim_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install_bench, "RESULTS", tmp_path)
    assert install_bench.main(["--installs", "slim", "--out", "installs"]) == 0
    slim = json.loads((tmp_path / "installs.json").read_text())["slim"]
    assert {"resnet-serve", "onnxruntime", "fastapi"} <= set(slim["names"]) and "torch" not in slim["names"]
    assert slim["packages"] == len(slim["names"]) and 100 < slim["mb"] < 1000
    assert "onnxruntime" in slim["largest_mb"] and "| `pip install '.'` |" in (tmp_path / "installs.md").read_text()
