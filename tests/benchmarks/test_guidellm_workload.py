"""benchmarks/guidellm_workload.py: the workload it draws, the datasets and scenario it hands guidellm,
and what it reads back. guidellm itself is not a test dependency: the checks against its own schema
and the run against a real server skip where it is not installed (CI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.guidellm_workload import (
    Workload,
    draw_requests,
    format_rows,
    scenario,
    summarize,
    write_datasets,
)

ROOT = Path(__file__).resolve().parents[2]


def test_draws_stay_within_the_workload_and_repeat_with_the_seed() -> None:
    workload = Workload(image_sides=(224, 1024), image_counts={1: 0.6, 2: 0.3, 3: 0.1}, output_tokens=(16, 512))
    specs = draw_requests(workload, 400)
    assert specs == draw_requests(workload, 400)
    assert specs != draw_requests(workload.model_copy(update={"seed": 1}), 400)
    sides = [side for spec in specs for size in spec.images for side in size]
    assert 224 <= min(sides) < 300 and 950 < max(sides) <= 1024
    tokens = [spec.output_tokens for spec in specs]
    assert 16 <= min(tokens) < 40 and 490 < max(tokens) <= 512
    counts = [len(spec.images) for spec in specs]
    assert set(counts) == {1, 2, 3}
    assert counts.count(1) > counts.count(2) > counts.count(3)  # 240 / 120 / 40 expected
    assert {spec.question for spec in specs} <= set(workload.questions)


def test_a_zero_weight_count_is_never_drawn() -> None:
    specs = draw_requests(Workload(image_counts={1: 0.0, 2: 1.0}), 50)
    assert all(len(spec.images) == 2 for spec in specs)


@pytest.mark.parametrize("fields", [
    {"image_sides": (0, 10)}, {"image_sides": (500, 400)}, {"output_tokens": (20, 10)},
    {"image_counts": {}}, {"image_counts": {0: 1.0}}, {"image_counts": {1: 0.0}}, {"questions": ()},
])
def test_a_workload_that_cannot_be_drawn_is_refused(fields: dict) -> None:
    with pytest.raises(ValueError):
        Workload(**fields)


def test_datasets_hold_each_request_across_slots(tmp_path: Path) -> None:
    specs = draw_requests(Workload(image_sides=(224, 260), image_counts={1: 1, 2: 1, 3: 1}, output_tokens=(16, 32)), 12)
    paths = write_datasets(specs, tmp_path)
    assert [p.name for p in paths] == ["slot-0.jsonl", "slot-1.jsonl", "slot-2.jsonl"]
    slots = [[json.loads(line) for line in p.read_text().splitlines()] for p in paths]
    assert all(len(rows) == len(specs) for rows in slots)
    for i, spec in enumerate(specs):
        assert slots[0][i]["prompt"] == spec.question
        assert slots[0][i]["output_tokens_count"] == spec.output_tokens
        for j, rows in enumerate(slots):
            if j < len(spec.images):
                with Image.open(rows[i]["image"]) as image:
                    assert (image.format, image.size) == ("JPEG", spec.images[j])
            else:
                assert rows[i]["image"] == ""
            if j > 0:
                assert set(rows[i]) == {"image"}


def test_scenario_runs_one_poisson_benchmark_per_rate_with_goodput_bounds(tmp_path: Path) -> None:
    config = scenario("http://127.0.0.1:9", [tmp_path / "slot-0.jsonl", tmp_path / "slot-1.jsonl"],
                      tmp_path / "report.json", model="m", rates=[1.0, 4.0], max_requests=50, max_seconds=60,
                      ttft_ms=1500, tpot_ms=40, seed=3)
    spec = config["spec"]
    assert spec["backend"] == {"kind": "openai_http", "target": "http://127.0.0.1:9", "model": "m",
                               "request_format": "/v1/chat/completions"}
    assert spec["profile"] == {"kind": "poisson", "rate": 1.0}  # no warmup/cooldown asked: none set
    assert config["benchmarks"] == [{"profile.rate": 1.0}, {"profile.rate": 4.0}]
    assert spec["constraints"] == [{"kind": "max_requests", "count": 50}, {"kind": "max_duration", "seconds": 60}]
    assert spec["data"] == [{"kind": "json_file", "path": str(tmp_path / f"slot-{j}.jsonl")} for j in range(2)]
    assert spec["metrics"]["slo"] == {"ttft_ms": 1500, "tpot_ms": 40}
    assert spec["outputs"] == [{"kind": "json", "path": str(tmp_path / "report.json")}]

    swept = scenario("http://h", [tmp_path / "a.jsonl"], tmp_path / "r.json", sweep=5, max_requests=10,
                     ttft_ms=1, tpot_ms=1, warmup=0.1, cooldown=0.2)["spec"]["profile"]
    assert swept == {"kind": "sweep", "sweep_size": 5, "strategy_type": "poisson",
                     "warmup": {"percent": 0.1}, "cooldown": {"percent": 0.2}}
    for load in ({}, {"rates": [1.0], "sweep": 3}, {"rates": []}, {"rates": [0.0]}):
        with pytest.raises(ValueError):
            scenario("http://h", [], tmp_path / "r.json", max_requests=1, ttft_ms=1, tpot_ms=1, **load)


def test_guidellm_accepts_the_scenario(tmp_path: Path) -> None:
    """The scenario against guidellm's own schema, where guidellm is installed."""
    schema = pytest.importorskip("guidellm.schemas.benchmark")
    datasets = write_datasets(draw_requests(Workload(image_sides=(224, 230)), 3), tmp_path)
    for load in ({"rates": [1.0, 2.0]}, {"sweep": 4}):
        config = scenario("http://127.0.0.1:9", datasets, tmp_path / "r.json", max_requests=3, ttft_ms=1000,
                          tpot_ms=50, warmup=0.1, **load)
        parsed = schema.BenchmarkScenario.model_validate(config)
        assert parsed.spec.metrics.slo.ttft_ms == 1000 and len(parsed.spec.data) == len(datasets)


def _distribution(mean: float, p50: float, p99: float) -> dict:
    return {"successful": {"mean": mean, "percentiles": {"p50": p50, "p99": p99}}, "errored": {}}


def test_summary_reads_throughput_goodput_and_latencies_from_the_report() -> None:
    metrics = {
        "request_totals": {"successful": 9, "errored": 1, "incomplete": 0, "total": 10},
        "requests_per_second": _distribution(2.5, 2.0, 4.0),
        "output_tokens_per_second": _distribution(640.0, 600.0, 900.0),
        "request_goodput": _distribution(2.0, 1.5, 3.0),
        "slo_attainment": 0.8, "slo_determined_requests": 9,
        "time_to_first_token_ms": _distribution(300.0, 250.0, 1200.0),
        "inter_token_latency_ms": _distribution(20.0, 18.0, 45.0),
        "request_latency": _distribution(3.0, 2.8, 6.0),
        "request_dispatch_delay": {"successful": {"mean": 0.001, "percentiles": {"p95": 0.004}}},
    }
    report = {"benchmarks": [{"config": {"strategy": {"type_": "poisson", "rate": 2.5}}, "duration": 4.0,
                              "metrics": metrics}]}
    [row] = summarize(report)
    assert row == {
        "strategy": "poisson", "rate": 2.5, "duration_s": 4.0, "completed": 9, "errored": 1, "incomplete": 0,
        "requests_per_s": 2.5, "output_tokens_per_s": 640.0, "goodput_requests_per_s": 2.0,
        "slo_attainment": 0.8, "slo_determined_requests": 9, "ttft_ms_p50": 250.0, "ttft_ms_p99": 1200.0,
        "itl_ms_p50": 18.0, "itl_ms_p99": 45.0, "latency_s_p50": 2.8, "dispatch_delay_s_p95": 0.004,
    }
    table = format_rows([row], 2000, 50)
    assert "poisson@2.5" in table and "80%" in table and "250/1200" in table


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("guidellm") is None, reason="guidellm is not installed (pip install -e .[bench])")
def test_a_small_load_against_the_demo_server(server, tmp_path: Path) -> None:
    """A few small requests at a Poisson rate through guidellm, end to end: every request completes,
    asks for its drawn output tokens and gets them (ignore_eos), and the summary has goodput."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "guidellm_workload.py"), "--target", server.base_url,
         "--rates", "2", "--max-requests", "4", "--image-sides", "224,320", "--image-counts", "1:1,2:1",
         "--output-tokens", "16,32", "--ttft-ms", "60000", "--tpot-ms", "10000", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=600,
        # Few client processes and time to start them: a small CI machine sends on schedule then.
        env={**os.environ, "GUIDELLM__MAX_WORKER_PROCESSES": "2", "GUIDELLM__SCHEDULER_START_DELAY_NON_DISTRIBUTED": "5"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = json.loads((out / "summary.json").read_text())["benchmarks"]
    assert (row["completed"], row["errored"]) == (4, 0)
    assert row["slo_attainment"] == 1.0 and row["goodput_requests_per_s"] == row["requests_per_s"] > 0
    report = json.loads((out / "guidellm.json").read_text())
    asked = draw_requests(Workload(image_sides=(224, 320), image_counts={1: 1, 2: 1}, output_tokens=(16, 32)), 4)
    got = [request["output_tokens"] for request in report["benchmarks"][0]["requests"]["successful"]]
    assert sorted(got) == sorted(spec.output_tokens for spec in asked)
