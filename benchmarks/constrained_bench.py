"""What constrained decoding costs the continuous engine: the same burst with and without a grammar.

    python benchmarks/constrained_bench.py --random-glm46v-shape --dtype bfloat16 --rows 32 --cuda-graphs \
        --compile --json $OUT/constrained.json
    python benchmarks/constrained_bench.py --random-glm46v-shape --tiny --rows 4 --new-tokens 16   # anywhere

One engine; B requests (one `--image-size` image each) decode `--new-tokens` tokens, unconstrained
and under a JSON schema (`SCHEMA`: an object with one free string, so that a random model's answer
runs long), alternately, `--repeats` times each. Reported per kind: median output tok/s of the
burst (tokens it produced over its wall time) and the median time between decode launches that the
engine logs (`BusyPeriod`): with grammar rows live, each step waits for the host to read the last
token and fill the next masks. Constrained rows may end early (their object closes), so the step
time is the fairer figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.common

from benchmarks.common import add_model_arguments, load_from_arguments, make_requests, parse_size
from engine.continuous.engine import ContinuousEngine
from serve_app.settings import ContinuousEngineSettings
from serve_app.stage_types import GrammarSpec

SCHEMA = GrammarSpec("json_schema", schema=json.dumps(
    {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}, sort_keys=True))


def burst(engine: ContinuousEngine, batch) -> tuple[float, int, float]:
    """(seconds, tokens out, ms of wall time per decode step) of one burst."""
    counts = [0] * len(batch)

    def on_step(entries) -> None:
        for i, entry in enumerate(entries):
            if entry is not None and not isinstance(entry, BaseException):
                counts[i] = entry.completion_tokens

    steps_before = engine.decode_steps
    started = time.perf_counter()
    engine.submit([replace(r) for r in batch], on_step).result()
    seconds = time.perf_counter() - started
    steps = engine.decode_steps - steps_before
    return seconds, sum(counts), seconds / max(steps, 1) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--image-size", default="448x448")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    loaded = load_from_arguments(args)
    options = ContinuousEngineSettings(max_slots=args.rows, cuda_graphs=args.cuda_graphs, compile=args.compile,
                                       warmup_max_len=1024)
    engine = ContinuousEngine(loaded.with_settings(continuous=options))
    plain = make_requests(loaded, args.rows, parse_size(args.image_size), "Describe this image in detail.",
                          args.new_tokens, args.seed)
    constrained = [replace(r, sampling=replace(r.sampling, grammar=SCHEMA)) for r in plain]
    engine.grammars.compile(SCHEMA)  # the compiler and this grammar, before any timing
    results: dict[str, list] = {"plain": [], "constrained": []}
    for _ in range(2):  # warm-up: capture, compile, the first grammar matchers
        burst(engine, plain[:2])
        burst(engine, constrained[:2])
    for _ in range(args.repeats):
        for kind, batch in (("plain", plain), ("constrained", constrained)):
            seconds, tokens, step_ms = burst(engine, batch)
            results[kind].append({"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
                                  "ms_per_step": step_ms})
    summary = {}
    for kind, runs in results.items():
        summary[kind] = {key: statistics.median(run[key] for run in runs) for key in ("tok_s", "ms_per_step", "tokens")}
        print(f"{kind:>12}: {summary[kind]['tok_s']:.1f} tok/s, {summary[kind]['ms_per_step']:.2f} ms per step "
              f"(wall / decode steps), {summary[kind]['tokens']:.0f} tokens a burst", flush=True)
    ratio = summary["constrained"]["ms_per_step"] / summary["plain"]["ms_per_step"]
    print(f"constrained / plain time per step: {ratio:.3f}", flush=True)
    engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "runs": results, "summary": summary,
                                               "step_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
