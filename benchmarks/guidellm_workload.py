"""A realistic load on a RUNNING server, measured by guidellm: mixed image sizes, several images in
some requests, mixed output lengths, Poisson arrivals at set rates; goodput next to throughput.

    python benchmarks/guidellm_workload.py --target http://127.0.0.1:8000 --rates 1,2,4 \\
        --max-requests 200 --ttft-ms 2000 --tpot-ms 50 --out results/guidellm

guidellm (`pip install -e .[bench]`; the GPU machine: tools/guidellm_bundle.sh) sends the requests,
times them and computes the statistics; this script only says what to send. It draws the requests
(`Workload`: each image's width and height uniform in 224..1024, one image per request or more with
the given weights, output tokens uniform in 16..512, a short question), writes them as guidellm
datasets and a guidellm scenario, runs `guidellm run --scenario`, and prints one line per rate:
throughput (requests/s, output tokens/s), goodput (requests/s that met BOTH the TTFT and the TPOT
bound, and their share), TTFT and inter-token latency P50/P99. `--sweep N` asks guidellm to find the
rates itself (synchronous, throughput, then N-2 Poisson rates between).

Why datasets and not guidellm's `synthetic_image` data: it draws one fixed image size, and its
`images_per_request` > 1 becomes a conversation of one image per turn (guidellm 0.8.1), not one
request with several images. guidellm zips datasets row by row and puts the `image` column of each
into the same request, skipping empty ones; so slot file j holds request i's (j+1)-th image or "".
Each request asks for exactly its output tokens (guidellm sends `max_completion_tokens` with
`ignore_eos`, which the server honours), so lengths do not depend on what the model says.

`vlm-serve bench` stays the fixed-length, closed-loop tool for the serving-overhead comparison
(benchmarks/serving_overhead.py); this one is the open-loop load. Written to `--out`: scenario.json
(what guidellm ran), guidellm.json (guidellm's full report; per-request payloads stripped) and
summary.json (the lines printed). The images live in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

QUESTIONS = (
    "Describe the image.",
    "What objects are in the picture, and what colour is each?",
    "Read any text you can see.",
    "Compare these images: what differs between them?",
    "Write a detailed caption for a photo archive.",
)


class Workload(BaseModel):
    """What each request is drawn from. Every draw is uniform within its bounds (inclusive)."""

    model_config = ConfigDict(frozen=True)

    image_sides: tuple[int, int] = Field((224, 1024), description="bounds of each image's width and of its height")
    image_counts: dict[int, float] = Field({1: 0.7, 2: 0.2, 3: 0.1},
                                           description="images per request -> relative weight")
    output_tokens: tuple[int, int] = Field((16, 512), description="bounds of the tokens each request asks for")
    questions: tuple[str, ...] = QUESTIONS
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> Workload:
        for name in ("image_sides", "output_tokens"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be 0 < low <= high, got {low}..{high}")
        if not self.image_counts or any(n < 1 or w < 0 for n, w in self.image_counts.items()) \
                or sum(self.image_counts.values()) <= 0:
            raise ValueError("image_counts needs counts >= 1 with weights >= 0, not all zero")
        if not self.questions:
            raise ValueError("questions must not be empty")
        return self


class RequestSpec(BaseModel):
    """One request: its question, the (width, height) of each image in order, the tokens it asks for."""

    question: str
    images: list[tuple[int, int]]
    output_tokens: int


def draw_requests(workload: Workload, count: int) -> list[RequestSpec]:
    """`count` requests drawn from `workload` with its seed: the same arguments give the same list."""
    rng = random.Random(workload.seed)
    counts, weights = zip(*sorted(workload.image_counts.items()))
    specs = []
    for _ in range(count):
        n_images = rng.choices(counts, weights)[0]
        specs.append(RequestSpec(
            question=rng.choice(workload.questions),
            images=[(rng.randint(*workload.image_sides), rng.randint(*workload.image_sides)) for _ in range(n_images)],
            output_tokens=rng.randint(*workload.output_tokens),
        ))
    return specs


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A colour gradient with grain: JPEG sizes near a photo's (a flat image would compress to almost
    nothing, and the server's decoding and upload costs would be a photo's fraction)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3) + np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1) * 96
    pixels = base + rng.normal(0, 18, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_datasets(specs: list[RequestSpec], directory: Path, seed: int = 0) -> list[Path]:
    """guidellm's datasets for `specs`: slot-0.jsonl has each request's question (`prompt`), output
    tokens (`output_tokens_count`) and first image, slot-j.jsonl its (j+1)-th image or "" (none), one line
    per request in order. Images are JPEG files beside them, referred to by absolute path."""
    directory.mkdir(parents=True, exist_ok=True)
    slots = max(len(spec.images) for spec in specs)
    rows: list[list[dict[str, Any]]] = [[] for _ in range(slots)]
    for i, spec in enumerate(specs):
        for j in range(slots):
            path = ""
            if j < len(spec.images):
                path = str((directory / f"request{i}-image{j}.jpg").resolve())
                make_image(*spec.images[j], seed=seed * 1_000_003 + i * slots + j).save(path, quality=90)
            row: dict[str, Any] = {"image": path}
            if j == 0:
                row = {"prompt": spec.question, "output_tokens_count": spec.output_tokens, **row}
            rows[j].append(row)
    paths = []
    for j, slot_rows in enumerate(rows):
        path = directory / f"slot-{j}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in slot_rows))
        paths.append(path)
    return paths


def scenario(target: str, datasets: list[Path], report: Path, *, model: str | None = None,
             rates: list[float] | None = None, sweep: int | None = None, max_requests: int,
             max_seconds: float | None = None, ttft_ms: float, tpot_ms: float, warmup: float = 0.0,
             cooldown: float = 0.0, seed: int = 0, workload: Workload | None = None) -> dict[str, Any]:
    """guidellm's scenario file (`guidellm run --scenario`): Poisson arrivals at each of `rates`
    (one benchmark per rate), or guidellm's sweep of `sweep` benchmarks; each benchmark stops after
    `max_requests` (and `max_seconds`, if given); warmup/cooldown are the fractions of each left out of
    its figures. Goodput counts the requests with TTFT <= `ttft_ms` and inter-token latency <= `tpot_ms`."""
    if (rates is None) == (sweep is None):
        raise ValueError("give either rates or sweep")
    if rates is not None and (not rates or min(rates) <= 0):
        raise ValueError(f"rates must be positive, got {rates}")
    profile: dict[str, Any] = ({"kind": "poisson", "rate": rates[0]} if rates is not None
                               else {"kind": "sweep", "sweep_size": sweep, "strategy_type": "poisson"})
    # Only when asked for: guidellm 0.8.1 leaves a request out at each end even at a fraction of 0.
    profile |= {phase: {"percent": fraction} for phase, fraction in (("warmup", warmup), ("cooldown", cooldown))
                if fraction > 0}
    constraints: list[dict[str, Any]] = [{"kind": "max_requests", "count": max_requests}]
    if max_seconds is not None:
        constraints.append({"kind": "max_duration", "seconds": max_seconds})
    backend: dict[str, Any] = {"kind": "openai_http", "target": target, "request_format": "/v1/chat/completions"}
    if model:
        backend["model"] = model
    return {
        "metadata": {"name": "vlm-serve realistic load", "workload": workload.model_dump(mode="json") if workload else None},
        "spec": {
            "backend": backend,
            "profile": profile,
            "constraints": constraints,
            "data": [{"kind": "json_file", "path": str(path)} for path in datasets],
            "metrics": {"kind": "generative", "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
                        "sample_size": 0},  # keep every request's timings, none of their base64 images
            "seed": {"kind": "static", "value": seed},
            "outputs": [{"kind": "json", "path": str(report)}],
        },
        # One benchmark per rate, as guidellm's sub-benchmarks (its list-valued profile.rate is deprecated).
        "benchmarks": [{"profile.rate": rate} for rate in rates] if rates is not None else [None],
    }


def _stat(metrics: dict[str, Any], name: str, statistic: str) -> float | None:
    """One statistic of guidellm's distribution `name` over successful requests ("mean", or a
    percentile such as "p50")."""
    successful = (metrics.get(name) or {}).get("successful") or {}
    value = successful.get(statistic) if statistic == "mean" else (successful.get("percentiles") or {}).get(statistic)
    return None if value is None else float(value)


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark of guidellm's JSON report: its strategy, request counts, throughput,
    goodput and latencies, as guidellm computed them."""
    rows = []
    for benchmark in report["benchmarks"]:
        metrics, strategy = benchmark["metrics"], benchmark["config"]["strategy"]
        totals = metrics["request_totals"]
        rows.append({
            "strategy": strategy["type_"],
            "rate": strategy.get("rate"),
            "duration_s": benchmark.get("duration"),
            "completed": totals["successful"],
            "errored": totals["errored"],
            "incomplete": totals["incomplete"],
            "requests_per_s": _stat(metrics, "requests_per_second", "mean"),
            "output_tokens_per_s": _stat(metrics, "output_tokens_per_second", "mean"),
            "goodput_requests_per_s": _stat(metrics, "request_goodput", "mean"),
            "slo_attainment": metrics.get("slo_attainment"),
            "slo_determined_requests": metrics.get("slo_determined_requests"),
            **{f"ttft_ms_{p}": _stat(metrics, "time_to_first_token_ms", p) for p in ("p50", "p99")},
            **{f"itl_ms_{p}": _stat(metrics, "inter_token_latency_ms", p) for p in ("p50", "p99")},
            "latency_s_p50": _stat(metrics, "request_latency", "p50"),
            # How late guidellm sent requests against their Poisson schedule: the rate is what was
            # asked only while this stays small (a client machine short of CPUs sends late).
            "dispatch_delay_s_p95": _stat(metrics, "request_dispatch_delay", "p95"),
        })
    return rows


def format_rows(rows: list[dict[str, Any]], ttft_ms: float, tpot_ms: float) -> str:
    """The rows as a fixed-width table, goodput beside throughput."""
    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = (f"{'strategy':<16} {'ok/err':>8} {'req/s':>7} {'out tok/s':>10} {'goodput/s':>10} "
              f"{'met SLO':>8} {'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>16} {'late p95 ms':>12}")
    lines = [f"goodput: TTFT <= {ttft_ms:g} ms and inter-token latency <= {tpot_ms:g} ms", header]
    for row in rows:
        name = row["strategy"] + (f"@{row['rate']:g}" if row["rate"] is not None else "")
        share = "-" if row["slo_attainment"] is None else f"{100 * row['slo_attainment']:.0f}%"
        lines.append(
            f"{name:<16} {str(row['completed']) + '/' + str(row['errored']):>8} {num(row['requests_per_s'], 2):>7} "
            f"{num(row['output_tokens_per_s']):>10} {num(row['goodput_requests_per_s'], 2):>10} {share:>8} "
            f"{num(row['ttft_ms_p50'], 0) + '/' + num(row['ttft_ms_p99'], 0):>17} "
            f"{num(row['itl_ms_p50']) + '/' + num(row['itl_ms_p99']):>16} "
            f"{num(None if row['dispatch_delay_s_p95'] is None else 1000 * row['dispatch_delay_s_p95'], 0):>12}")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _bounds(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def _weights(text: str) -> dict[int, float]:
    """"1:0.7,2:0.2,3:0.1" -> {1: 0.7, 2: 0.2, 3: 0.1}"""
    return {int(n): float(w) for n, w in (item.split(":") for item in text.split(",") if item)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="the model id to ask for (default: the first /v1/models lists)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rates", type=_floats, help="Poisson arrival rates in requests/s, one benchmark each: 1,2,4")
    load.add_argument("--sweep", type=int, help="guidellm's sweep of this many benchmarks (it picks the rates)")
    parser.add_argument("--max-requests", type=int, required=True, help="requests per benchmark (and requests drawn)")
    parser.add_argument("--max-seconds", type=float, default=None, help="also stop each benchmark after this long")
    parser.add_argument("--ttft-ms", type=float, default=2000.0, help="goodput's time-to-first-token bound")
    parser.add_argument("--tpot-ms", type=float, default=50.0, help="goodput's bound on the time per output token "
                                                                    "after the first (inter-token latency)")
    parser.add_argument("--warmup", type=float, default=0.0, help="fraction of each benchmark left out at its start")
    parser.add_argument("--cooldown", type=float, default=0.0, help="fraction of each benchmark left out at its end")
    parser.add_argument("--image-sides", type=_bounds, default=(224, 1024), help="bounds of image width and height")
    parser.add_argument("--image-counts", type=_weights, default={1: 0.7, 2: 0.2, 3: 0.1},
                        help="images per request with weights: 1:0.7,2:0.2,3:0.1")
    parser.add_argument("--output-tokens", type=_bounds, default=(16, 512), help="bounds of the output tokens asked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="directory for scenario.json, guidellm.json, summary.json")
    parser.add_argument("--guidellm", default="guidellm", help="the command that runs guidellm (e.g. 'python3 -m guidellm')")
    args = parser.parse_args(argv)

    workload = Workload(image_sides=args.image_sides, image_counts=args.image_counts,
                        output_tokens=args.output_tokens, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    report = (args.out / "guidellm.json").resolve()
    report.unlink(missing_ok=True)  # an earlier run's report must not pass for this one's
    with tempfile.TemporaryDirectory(prefix="guidellm-workload-") as tmp:
        datasets = write_datasets(draw_requests(workload, args.max_requests), Path(tmp) / "data", seed=args.seed)
        config = scenario(args.target, datasets, report, model=args.model, rates=args.rates, sweep=args.sweep,
                          max_requests=args.max_requests, max_seconds=args.max_seconds, ttft_ms=args.ttft_ms,
                          tpot_ms=args.tpot_ms, warmup=args.warmup, cooldown=args.cooldown, seed=args.seed,
                          workload=workload)
        scenario_path = args.out / "scenario.json"
        scenario_path.write_text(json.dumps(config, indent=2))
        # Offline: the datasets are local files, and guidellm must never reach for a hub. Its dataset
        # cache goes to the temporary directory, not the home directory.
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(Path(tmp) / "hf-datasets")}
        command = [*shlex.split(args.guidellm), "run", "--scenario", str(scenario_path), "--disable-progress"]
        status = subprocess.run(command, env=env, check=False).returncode
    if status != 0 or not report.is_file():
        print(f"guidellm exited with {status}" + ("" if report.is_file() else f" and wrote no {report}"), file=sys.stderr)
        return status or 1
    rows = summarize(json.loads(report.read_text()))
    (args.out / "summary.json").write_text(json.dumps(
        {"slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms}, "workload": workload.model_dump(mode="json"),
         "benchmarks": rows}, indent=2))
    print(format_rows(rows, args.ttft_ms, args.tpot_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
