"""The serving overhead: the same workload through Ray Serve and HTTP against the engine alone.

    python benchmarks/serving_overhead.py engine.json e2e-c1.json e2e-c8.json e2e-c32.json

`engine.json` is `benchmarks/engine_bench.py --json` (the continuous engine, no Ray, no HTTP);
each `e2e-cN.json` is `vlm-serve bench --concurrency N --out` against a server running the same
model and engine settings (tools/device_e2e.sh makes both in one run). Per concurrency level it
prints both output tok/s, their ratio and the overhead (1 - ratio; the target: at most 5% at 32),
and the engine's time to first token next to the HTTP client's P50.

The workloads match where `vlm-serve bench` sends N requests at concurrency N (one burst, as the
engine bench's batch of N) with the engine bench's image size, prompt and output tokens; a report of
K x N requests at concurrency N (a sustained load) is read against the engine's `--sustained K`. Several
reports of one level (repeated bursts) also get the median of their HTTP figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def rows(engine: dict[str, Any], e2e_reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    levels = {level["batch_size"]: level for level in engine["levels"]}
    out = []
    for report in e2e_reports:
        concurrency = report["config"]["concurrency"]
        level = levels.get(concurrency)
        if level is None or "continuous" not in level:
            raise SystemExit(f"{engine.get('command', 'engine.json')} has no continuous-engine level {concurrency}")
        if report["config"]["output_tokens"] != engine["new_tokens"]:
            raise SystemExit(f"output tokens differ: {report['config']['output_tokens']} over HTTP, "
                             f"{engine['new_tokens']} at the engine")
        summary = report["summary"]
        requests = report["config"]["num_requests"]
        if requests > concurrency:  # a sustained load: against the engine's closed loop of as many requests
            engine_figures = level.get("sustained")
            if engine_figures is None or engine_figures["requests"] != requests:
                raise SystemExit(f"the engine ran no sustained load of {requests} requests at {concurrency} "
                                 f"(engine_bench.py --sustained {requests // concurrency})")
        else:
            engine_figures = level["continuous"]
        served, alone = summary["output_tokens_per_s"], engine_figures["total_tok_s"]
        out.append({
            "concurrency": concurrency,
            "load": "sustained" if requests > concurrency else "burst",
            "warmup": report["config"].get("warmup", 1),
            "requests": summary["successes"],
            "engine_tok_s": alone,
            "http_tok_s": served,
            "ratio": served / alone,
            "overhead": 1 - served / alone,
            "engine_ttft_s": engine_figures.get("ttft_p50_s", engine_figures.get("ttft_s")),
            "http_ttft_p50_s": summary["ttft_s"]["p50"],
        })
    return out


def workload(row: dict[str, Any]) -> tuple[int, str, int]:
    """What repeated runs share: their medians are taken over runs of one workload."""
    return row["concurrency"], row["load"], row["warmup"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path, help="engine_bench.py --json output")
    parser.add_argument("e2e", type=Path, nargs="+", help="vlm-serve bench --out outputs, one per concurrency")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    table = rows(json.loads(args.engine.read_text()), [json.loads(p.read_text()) for p in args.e2e])
    print(f"{'conc':>5}{'load':>10}{'reqs':>6}{'engine tok/s':>14}{'HTTP tok/s':>12}{'ratio':>8}{'overhead':>10}"
          f"{'engine TTFT s':>15}{'HTTP TTFT P50 s':>17}")
    for r in table:
        print(f"{r['concurrency']:>5}{r['load']:>10}{r['requests']:>6}{r['engine_tok_s']:>14.1f}{r['http_tok_s']:>12.1f}"
              f"{r['ratio']:>7.2f}x{r['overhead']:>9.1%}{r['engine_ttft_s']:>15.3f}{r['http_ttft_p50_s']:>17.3f}")
    levels = sorted({workload(r) for r in table})
    if any(sum(workload(r) == key for r in table) > 1 for key in levels):
        print("medians over the runs of each workload (warm-up requests in brackets):")
        for key in levels:
            runs = [r for r in table if workload(r) == key]
            http = statistics.median(r["http_tok_s"] for r in runs)
            c, load, warmup = key
            print(f"{c:>5}{load:>10}{len(runs):>6} runs [{warmup}]{runs[0]['engine_tok_s']:>6.1f}{http:>12.1f}"
                  f"{http / runs[0]['engine_tok_s']:>7.2f}x{1 - http / runs[0]['engine_tok_s']:>9.1%}"
                  f"{'':>15}{statistics.median(r['http_ttft_p50_s'] for r in runs):>17.3f}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
