"""The measuring tools of issue 7: `vlm-serve bench` (client) and benchmarks/engine_bench.py (engine)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serve_app.cli import bench
from serve_app.cli.bench import RequestResult, aggregate, parse_image_sizes, percentile, poisson_delays, summarize

ROOT = Path(__file__).resolve().parents[2]


def load_engine_bench():
    spec = importlib.util.spec_from_file_location("engine_bench", ROOT / "benchmarks" / "engine_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# ---- pure statistics ---------------------------------------------------------------------------


def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101):
        values = [rng.uniform(0, 5) for _ in range(n)]
        for q in (0, 1, 50, 95, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s == {"count": 4, "mean": 2.5, "min": 1.0, "p50": 2.5, "p95": pytest.approx(3.85),
                 "p99": pytest.approx(3.97), "max": 4.0}
    assert summarize([]) == {"count": 0, "mean": None, "min": None, "p50": None, "p95": None, "p99": None, "max": None}


def result(index: int, ok: bool = True, start: float = 0.0, end: float = 1.0, ttft: float | None = 0.2,
           itls: list[float] | None = None, tokens: int | None = 5, error: str | None = None) -> RequestResult:
    return RequestResult(index=index, ok=ok, start=start, end=end, ttft=ttft, itls=itls or [],
                         prompt_tokens=10 if ok else None, completion_tokens=tokens if ok else None, error=error)


def test_aggregate_counts_tokens_errors_and_rates() -> None:
    results = [
        result(0, start=0.0, end=1.0, ttft=0.2, itls=[0.1, 0.3], tokens=5),
        result(1, start=0.5, end=2.5, ttft=0.4, itls=[0.2], tokens=5),
        result(2, start=0.5, end=1.5, ttft=0.1, itls=[], tokens=4),
        result(3, ok=False, error="http_503"),
        result(4, ok=False, error="http_503"),
        result(5, ok=False, error="timeout"),
    ]
    s = aggregate(results, duration_s=2.0, expected_tokens=5)
    assert (s["requests"], s["successes"], s["failures"]) == (6, 3, 3)
    assert s["errors"] == {"http_503": 2, "timeout": 1}
    assert s["total_output_tokens"] == 14 and s["total_prompt_tokens"] == 30
    assert s["requests_per_s"] == 1.5 and s["output_tokens_per_s"] == 7.0
    assert s["wrong_token_count"] == 1
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["ttft_s"]["count"] == 3
    assert s["itl_s"]["count"] == 3 and s["itl_s"]["max"] == pytest.approx(0.3)  # every gap of every request
    assert s["e2e_s"]["p50"] == pytest.approx(1.0) and s["e2e_s"]["max"] == pytest.approx(2.0)
    # TPOT: (e2e - ttft) / (tokens - 1)
    assert s["tpot_s"]["min"] == pytest.approx((1.0 - 0.2) / 4)
    table = bench.format_table(s)
    for word in ("TTFT", "ITL", "end-to-end", "P50", "P95", "P99", "req/s", "output tok/s", "http_503=2"):
        assert word in table
    json.dumps(s)  # the JSON file holds exactly this


def test_aggregate_of_nothing_good() -> None:
    s = aggregate([result(0, ok=False, error="connection")], duration_s=0.0)
    assert s["successes"] == 0 and s["requests_per_s"] is None and s["ttft_s"]["p50"] is None
    assert "errors: connection=1" in bench.format_table(s)


def test_image_sizes_poisson_arrivals_and_error_kinds() -> None:
    assert parse_image_sizes(["448x448", "224x224, 64X32"]) == [(448, 448), (224, 224), (64, 32)]
    assert parse_image_sizes(None) == []
    with pytest.raises(argparse.ArgumentTypeError):
        parse_image_sizes(["448"])
    delays = poisson_delays(10.0, 4000, seed=3)
    assert delays == poisson_delays(10.0, 4000, seed=3)
    assert sum(delays) / len(delays) == pytest.approx(0.1, rel=0.05)
    assert poisson_delays(math.inf, 3, seed=0) == [0.0, 0.0, 0.0]

    class StatusError(Exception):
        status_code = 429

    assert bench.error_kind(StatusError()) == "http_429"
    assert bench.error_kind(TimeoutError()) == "timeout"
    assert bench.error_kind(ValueError("x")) == "ValueError"


def test_images_are_data_urls_of_the_asked_size() -> None:
    import base64
    import io

    from PIL import Image

    url = bench.make_image_url((40, 30), seed=1)
    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (40, 30)
    assert url != bench.make_image_url((40, 30), seed=2)
    assert bench.build_messages("hi", [])[0]["content"] == "hi"
    parts = bench.build_messages("hi", [url, url])[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]


def test_register_adds_the_bench_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="vlm-serve")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.register(commands)
    args = parser.parse_args(["bench", "--concurrency", "3", "--image-size", "64x64", "--image-size", "32x32,16x16"])
    assert args.run is bench._run and args.concurrency == 3
    assert parse_image_sizes(args.image_size) == [(64, 64), (32, 32), (16, 16)]


# ---- the client against a real server ----------------------------------------------------------


@pytest.mark.integration
def test_bench_client_against_the_server(server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    code = bench.main([
        "--base-url", f"{server.base_url}/v1", "--num-requests", "6", "--concurrency", "3",
        "--output-tokens", "8", "--image-size", "64x64", "--warmup", "1", "--out", str(out), "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "req/s" in printed
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert report["config"]["model"] == "glm-4.6v-flash-demo"  # the first of /v1/models
    assert (summary["successes"], summary["failures"], summary["errors"]) == (6, 0, {})
    for key in ("ttft_s", "itl_s", "e2e_s", "tpot_s"):
        assert {"p50", "p95", "p99", "mean", "count"} <= summary[key].keys()
    assert summary["ttft_s"]["count"] == 6 and summary["e2e_s"]["p99"] >= summary["ttft_s"]["p50"] > 0
    assert summary["requests_per_s"] > 0 and summary["output_tokens_per_s"] > 0
    assert summary["total_output_tokens"] == 48 and summary["wrong_token_count"] == 0
    assert [r["completion_tokens"] for r in report["requests"]] == [8] * 6
    assert all(r["finish_reason"] == "length" and r["prompt_tokens"] > 0 for r in report["requests"])


# ---- the engine benchmark on CPU ---------------------------------------------------------------


def test_engine_bench_on_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    engine_bench = load_engine_bench()
    out = tmp_path / "engine.json"
    code = engine_bench.main([
        "--model", "configs/models/demo.yaml", "--device", "cpu", "--batch-sizes", "1,2", "--new-tokens", "4",
        "--image-size", "64x64", "--warmup", "0", "--json", str(out),
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = printed.splitlines()
    for b in (1, 2):
        assert any(line.split()[:2] == [str(b), "baseline"] for line in lines), printed
        assert any(line.split()[:2] == [str(b), "engine"] and line.rstrip().endswith("yes") for line in lines), printed
    assert "greedy outputs of engine == generate(): yes" in printed
    report = json.loads(out.read_text())
    assert report["outputs_equal"] is True
    assert [lv["batch_size"] for lv in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["compared"] == "token ids" and level["outputs_equal"]
        for path in ("baseline", "engine"):
            f = level[path]
            assert f["ttft_s"] > 0 and f["total_s"] >= f["ttft_s"] and f["total_tok_s"] > 0
        assert level["ratio_engine_over_baseline"]["total_tok_s"] > 0


def test_random_glm46v_shape_runs_tiny_on_cpu(capsys: pytest.CaptureFixture) -> None:
    engine_bench = load_engine_bench()
    code = engine_bench.main(["--random-glm46v-shape", "--tiny", "--device", "cpu", "--batch-sizes", "2",
                              "--new-tokens", "2", "--image-size", "112x112", "--warmup", "0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "glm-4.6v-flash-random-tiny" in printed and "greedy outputs of engine == generate(): yes" in printed


# ---- the serving overhead: engine alone vs the same workload over HTTP --------------------------


@pytest.mark.integration
def test_serving_overhead_reads_the_engine_and_http_figures_of_one_workload(
    server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = importlib.util.spec_from_file_location("serving_overhead", ROOT / "benchmarks" / "serving_overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    engine_json, table_json = tmp_path / "engine.json", tmp_path / "rows.json"
    burst_json, sustained_json = tmp_path / "e2e-c3.json", tmp_path / "e2e-c3-sustained.json"
    assert load_engine_bench().main([
        "--model", "configs/models/demo.yaml", "--device", "cpu", "--batch-sizes", "3", "--new-tokens", "8",
        "--image-size", "64x64", "--engines", "continuous", "--warmup", "0", "--arrival-after", "0",
        "--sustained", "2", "--json", str(engine_json),
    ]) == 0
    sustained = json.loads(engine_json.read_text())["levels"][0]["sustained"]
    assert sustained["requests"] == 6 and sustained["total_tok_s"] == pytest.approx(48 / sustained["total_s"])
    for out, requests, warmup in ((burst_json, "3", "1"), (sustained_json, "6", "3")):  # 3: sent at once
        assert bench.main([
            "--base-url", f"{server.base_url}/v1", "--num-requests", requests, "--concurrency", "3",
            "--output-tokens", "8", "--image-size", "64x64", "--warmup", warmup, "--out", str(out), "--no-progress",
        ]) == 0
    capsys.readouterr()
    assert overhead.main([str(engine_json), str(burst_json), str(sustained_json), "--json", str(table_json)]) == 0
    printed = capsys.readouterr().out
    burst, steady = json.loads(table_json.read_text())
    assert (burst["load"], burst["requests"], steady["load"], steady["requests"]) == ("burst", 3, "sustained", 6)
    assert (burst["warmup"], steady["warmup"]) == (1, 3)  # warm-up requests are not counted
    assert steady["engine_tok_s"] == sustained["total_tok_s"]  # each load against its own engine figure
    for row in (burst, steady):
        assert row["concurrency"] == 3 and row["engine_tok_s"] > 0 and row["http_tok_s"] > 0
        assert row["ratio"] == pytest.approx(row["http_tok_s"] / row["engine_tok_s"])
        assert 0 < row["http_ttft_p50_s"] and 0 < row["engine_ttft_s"]
    assert [line.split()[:3] for line in printed.splitlines()[1:3]] == [["3", "burst", "3"], ["3", "sustained", "6"]]

    engine_without = json.loads(engine_json.read_text())
    del engine_without["levels"][0]["sustained"]
    with pytest.raises(SystemExit, match="no sustained load of 6 requests"):
        overhead.rows(engine_without, [json.loads(sustained_json.read_text())])

    mismatched = json.loads(burst_json.read_text())
    mismatched["config"]["output_tokens"] = 9
    with pytest.raises(SystemExit, match="output tokens differ"):
        overhead.rows(json.loads(engine_json.read_text()), [mismatched])


@pytest.mark.integration
def test_burst_timeline_reads_each_stage_of_a_burst_from_the_serve_log(server, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("burst_timeline", ROOT / "benchmarks" / "burst_timeline.py")
    timeline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = timeline  # its dataclass looks the module up while the file runs
    spec.loader.exec_module(timeline)
    assert bench.main([
        "--base-url", f"{server.base_url}/v1", "--num-requests", "4", "--concurrency", "4", "--output-tokens", "4",
        "--image-size", "64x64", "--no-progress",
    ]) == 0
    deadline = time.monotonic() + 30  # Ray forwards the replicas' lines to the log a little later
    while True:
        calls, admissions = timeline.parse(server.log_path.read_text(errors="replace").splitlines())
        model = [c for burst in timeline.bursts(calls, 4) for c in burst]
        ids = {c.request_id for c in model}
        stages = {c.deployment for c in calls if c.request_id in ids}
        if {"Ingress", "ImagePreprocessor", "VLMServer"} <= stages or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"Ingress", "ImagePreprocessor", "VLMServer"} <= stages and admissions
    assert all(c.start <= c.end for c in calls)
    capsys.readouterr()
    assert timeline.main([str(server.log_path), "--min-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "model generate began" in printed and "admitted to the engine" in printed
