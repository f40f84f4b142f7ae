"""The model stage alone (no Ray, no HTTP): the engines vs plain `generate()`.

    python benchmarks/engine_bench.py                                   # demo model, CPU-sized
    python benchmarks/engine_bench.py --model configs/models/demo.yaml --batch-sizes 1,2 --new-tokens 4
    python benchmarks/engine_bench.py --random-glm46v-shape --batch-sizes 1,8,32 --new-tokens 128 \\
        --image-size 448x448 --json $OUT/engine.json                   # on a GPU: the production shape
    python benchmarks/engine_bench.py --random-glm46v-shape --batch-sizes 1,8,32 --new-tokens 128 \\
        --image-size 448x448 --engines continuous --cuda-graphs --compile --json $OUT/engine-graphs.json
    python benchmarks/engine_bench.py --random-glm46v-shape --batch-sizes 32 --new-tokens 128 \\
        --engines continuous --cuda-graphs --compile --kv-cache none,int8   # the int8 KV cache beside bf16's

Each concurrency level B makes B requests, each with one image of `--image-size` (distinct pixels
per row) and `--prompt`, prepared as the server prepares them (chat template, image tokens). The
same prepared rows then run, in the same process and order:
- baseline: plain `model.generate()` on the engines' left-padded collation, greedy, with
  `min_new_tokens = max_new_tokens = N` (exactly N tokens; end-of-sequence is suppressed);
- engine: the generate() engine (`GenerateEngine`) with `SamplingParams(max_tokens=N, temperature=0,
  ignore_eos=True)`;
- continuous: the same rows through the continuous engine (`ContinuousEngine`: slot KV cache,
  per-step admission; `--cuda-graphs`/`--compile` as in the model YAML's `continuous:`).
`--engines` picks which of the two run (both by default); the baseline always runs.
`--kv-cache` picks the continuous engine's paged KV cache format; `--kv-cache none,int8` builds one
continuous engine per format and runs both side by side (paths `continuous` and `continuous-int8`).
An int8 cache's greedy tokens are not expected to equal `generate()`'s, so they are shown but leave
the exit status alone.
Figures per path: TTFT (call -> the first generated token on the host: for the engines, the first
token their detokenizer receives, which the first `on_step` callback carries unless the token has no
text (`first_callback_s` reports that call too); for the baseline, the first stopping-criterion call
of `generate()`, after a device sync), wall time, output tok/s per sequence (N / wall, and
decode-only (N-1) / (wall - TTFT)) and total output tok/s; the ratio to the baseline; and whether
each path's greedy tokens equal `generate()`'s, row by row.

For the continuous engine at B > 1 an arrival is also measured: B-1 rows decode, and after
`--arrival-after` of their steps one more request (the B-th row) is submitted; reported are its
time to first token and the decode steps launched between its arrival and its first token (at most
2 plus its own prefill, by design), next to the running rows' step time. With `--sustained K` the
continuous engine also runs K x B requests with B in flight, each finished one replaced at once (a
closed loop, as `vlm-serve bench --concurrency B --num-requests K*B` drives a server): the baseline
for the serving overhead of a sustained load rather than one burst.

`--random-glm46v-shape` builds a GLM-4.6V-Flash-shaped model (`benchmarks.common.glm46v_shape`:
10.3B parameters, random weights) with the demo tokenizer and GLM-4.6V's default image processor
(448x448 -> 256 image tokens); `--tiny` shrinks it to a CPU's size to try the path anywhere.
`--weights gptq4` serves its decoder linears as a GPTQ-4 checkpoint (group size 128) is served:
rounded to gptqmodel's 4-bit layout, then repacked for PyTorch's int4 matmul by the server's own
code (engine/quant/int4_linear.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.common

from benchmarks.common import (
    add_model_arguments,
    load_from_arguments,
    make_requests,
    parse_size,
    sync,
    weight_bytes,
    with_tokens,
)
from engine.continuous.engine import ContinuousEngine
from engine.detokenizer import Detokenizer
from engine.generate.engine import GenerateEngine
from engine.loader import LoadedModel
from engine.prompts import PreparedRequest
from engine.protocol import Engine
from serve_app.settings import ContinuousEngineSettings

# ---- the two paths -----------------------------------------------------------------------------


@dataclass
class Run:
    ttft_s: float
    total_s: float
    tokens: list[list[int]] = field(default_factory=list)  # each row's generated ids
    texts: list[str] = field(default_factory=list)
    first_callback_s: float | None = None  # engine: the first on_step call that carried text
    row_ttft_s: list[float] = field(default_factory=list)  # engine: each row's first token (baseline: all at ttft_s)


@torch.inference_mode()
def run_baseline(loaded: LoadedModel, batch: list[PreparedRequest], new_tokens: int) -> Run:
    """Plain `generate()`: greedy, left-padded, exactly `new_tokens` per row."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    first: list[float] = []

    class FirstStep(StoppingCriteria):  # called once per step, after the new token is appended
        def __call__(self, input_ids, scores, **kwargs):
            if not first:
                sync(loaded.device)
                first.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    sync(loaded.device)
    start = time.perf_counter()
    inputs = loaded.collate(batch)
    out = loaded.model.generate(
        **inputs,
        generation_config=GenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            eos_token_id=sorted(loaded.eos_token_ids), pad_token_id=loaded.pad_token_id,
        ),
        stopping_criteria=StoppingCriteriaList([FirstStep()]),
    )
    sync(loaded.device)
    total = time.perf_counter() - start
    tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
    texts = [loaded.tokenizer.decode(row, skip_special_tokens=True).rstrip("\ufffd") for row in tokens]
    return Run(first[0] - start, total, tokens, texts)


@contextmanager
def _detokenizers(engine: GenerateEngine | ContinuousEngine, kind: type[Detokenizer]):
    """Rows `engine` makes meanwhile decode with `kind` (a recording subclass of Detokenizer)."""
    original = engine.detokenizer_type
    engine.detokenizer_type = kind
    try:
        yield
    finally:
        engine.detokenizer_type = original


def _recording(made: list) -> type[Detokenizer]:
    """A Detokenizer that adds itself to `made` (rows are made in batch order) and notes its first token."""

    class Recording(Detokenizer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.first_token_at: float | None = None
            made.append(self)

        def add(self, token: int):
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            return super().add(token)

    return Recording


def run_engine(engine: GenerateEngine | ContinuousEngine, batch: list[PreparedRequest], spread_s: float = 0.0,
               group: int = 3) -> Run:
    """The engine's batch path, as the VLMServer drives it (minus Ray). With `spread_s` (continuous
    engine), the rows arrive in groups of `group`, evenly over that many seconds, as a served burst's
    requests reach the model replica one `@serve.batch` call at a time, instead of all at once."""
    first: list[float] = []
    texts = [""] * len(batch)
    detokenizers: list = []

    def on_step(chunks, offset: int = 0) -> None:
        if not first:
            first.append(time.perf_counter())
        for i, chunk in enumerate(chunks):
            if chunk is not None:
                texts[offset + i] += chunk.text

    sync(engine.device)
    with _detokenizers(engine, _recording(detokenizers)):
        start = time.perf_counter()
        if spread_s > 0:
            starts = range(0, len(batch), group)
            futures = []
            for n, offset in enumerate(starts):
                time.sleep(max(0.0, start + n * spread_s / max(1, len(starts) - 1) - time.perf_counter()))
                futures.append(engine.submit(batch[offset:offset + group],
                                             lambda chunks, offset=offset: on_step(chunks, offset)))
            for future in futures:
                future.result()
        else:
            engine.generate_batch(batch, on_step)
        sync(engine.device)
        total = time.perf_counter() - start
    while engine.busy:  # the continuous engine's extra step: each run its own busy period (and log line)
        time.sleep(0.001)
    tokens = [list(d.tokens) for d in detokenizers] if len(detokenizers) == len(batch) else []
    # The first token reaches the host at the first step; on_step may come later when that token
    # has no text of its own (e.g. ids outside a small tokenizer's vocabulary).
    seen = [d.first_token_at for d in detokenizers if getattr(d, "first_token_at", None) is not None]
    first_token = min(seen) if seen else first[0]
    rows = [t - start for t in seen] if len(seen) == len(batch) else []
    return Run(first_token - start, total, tokens, texts, first_callback_s=first[0] - start, row_ttft_s=rows)


def run_sustained(engine: ContinuousEngine, batch: list[PreparedRequest], total: int) -> dict[str, float]:
    """`total` requests through the continuous engine, `len(batch)` in flight at any time (a closed
    loop: each finished request is replaced at once by the next, the rows cycled), as `vlm-serve bench
    --concurrency B --num-requests total` drives a server. Each request is its own group, as the
    client's are. Output tok/s over the whole run, and the median time to first token."""
    from concurrent.futures import FIRST_COMPLETED, wait

    first_at: dict[int, float] = {}
    submitted_at: dict[int, float] = {}

    def submit(index: int):
        row = replace(batch[index % len(batch)], cancelled=False, engine_row=None)

        def on_step(chunks) -> None:
            if index not in first_at and any(c is not None for c in chunks):
                first_at[index] = time.perf_counter()

        submitted_at[index] = time.perf_counter()
        return engine.submit([row], on_step)

    sync(engine.device)
    start = time.perf_counter()
    pending = {submit(i) for i in range(min(len(batch), total))}
    sent = len(pending)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            future.result()
        while sent < total and len(pending) < len(batch):
            pending.add(submit(sent))
            sent += 1
    sync(engine.device)
    wall = time.perf_counter() - start
    while engine.busy:
        time.sleep(0.001)
    tokens = sum(r.max_tokens for r in (batch[i % len(batch)] for i in range(total)))
    return {
        "requests": total,
        "total_s": wall,
        "total_tok_s": tokens / wall,
        "ttft_p50_s": statistics.median(first_at[i] - submitted_at[i] for i in first_at) if first_at else None,
    }


def figures(runs: list[Run], batch: int, new_tokens: int) -> dict[str, float]:
    """Median over repeats of each figure."""
    ttft = statistics.median(r.ttft_s for r in runs)
    total = statistics.median(r.total_s for r in runs)
    decode = statistics.median((new_tokens - 1) / max(r.total_s - r.ttft_s, 1e-9) for r in runs) if new_tokens > 1 else None
    # Rows of one generate() call all get their first token at once; the continuous engine's rows
    # each get theirs after their own prefill, which a burst larger than max_prefill_tokens spreads out.
    row_ttft = [statistics.median(r.row_ttft_s) if r.row_ttft_s else r.ttft_s for r in runs]
    return {
        "ttft_s": ttft,
        "ttft_p50_s": statistics.median(row_ttft),
        "total_s": total,
        "tok_s_per_seq": new_tokens / total,
        "decode_tok_s_per_seq": decode,
        "total_tok_s": batch * new_tokens / total,
        "repeats": len(runs),
        **({"first_callback_s": statistics.median(r.first_callback_s for r in runs)}
           if all(r.first_callback_s is not None for r in runs) else {}),
    }


def outputs_equal(a: Run, b: Run) -> bool:
    if a.tokens and b.tokens:
        return a.tokens == b.tokens
    return a.texts == b.texts


def first_difference(a: Run, b: Run) -> int | None:
    """The earliest token index at which any row of `b` leaves `a`'s tokens (None: none does).

    Tells a wrong step (rows part at once) from rounding (in bf16 with random weights, whose logits
    are nearly flat, two correct implementations can part after tens of tokens)."""
    if not (a.tokens and b.tokens):
        return None
    found = []
    for ra, rb in zip(a.tokens, b.tokens):
        at = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None)
        if at is None and len(ra) != len(rb):
            at = min(len(ra), len(rb))
        if at is not None:
            found.append(at)
    return min(found) if found else None


# ---- the run -----------------------------------------------------------------------------------


PATHS = {"engine": "generate", "continuous": "continuous"}  # result key -> --engines name


def run_levels(loaded: LoadedModel, engines: dict[str, Engine], cengine: ContinuousEngine | None,
               args: argparse.Namespace, approximate: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every level through the baseline and `engines`; paths in `approximate` (an int8 KV cache) are
    compared with the baseline but not held to it."""
    size = parse_size(args.image_size)
    levels = []
    for b in [int(v) for v in args.batch_sizes.split(",") if v.strip()]:
        t0 = time.perf_counter()
        batch = make_requests(loaded, b, size, args.prompt, args.new_tokens, args.seed)
        prepare_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            warm = min(args.new_tokens, 2)
            run_baseline(loaded, batch, warm)
            for path in engines.values():
                run_engine(path, with_tokens(batch, warm))
        base_runs: list[Run] = []
        path_runs: dict[str, list[Run]] = {key: [] for key in engines}
        for _ in range(args.repeats):
            base_runs.append(run_baseline(loaded, batch, args.new_tokens))
            for key, path in engines.items():
                path_runs[key].append(run_engine(path, batch, args.arrival_spread if key.startswith("continuous")
                                                 else 0.0, args.arrival_group))
        base = figures(base_runs, b, args.new_tokens)
        level: dict[str, Any] = {
            "batch_size": b,
            "prompt_tokens": [r.prompt_tokens for r in batch],
            "image_tokens": batch[0].image_tokens,
            "prepare_s": prepare_s,
            "baseline": base,
            "paths": list(path_runs),
        }
        equal = []
        for key, runs in path_runs.items():
            f = figures(runs, b, args.new_tokens)
            same = outputs_equal(base_runs[-1], runs[-1])
            level[key] = f
            level[f"ratio_{key}_over_baseline"] = {"total_tok_s": f["total_tok_s"] / base["total_tok_s"],
                                                   "ttft": f["ttft_s"] / base["ttft_s"]}
            level[f"outputs_equal_{key}"] = same
            level[f"first_difference_{key}"] = first_difference(base_runs[-1], runs[-1])
            level[f"compared_{key}"] = "token ids" if base_runs[-1].tokens and runs[-1].tokens else "text"
            if key not in approximate:
                equal.append(same)
        if "engine" in path_runs:  # the generate-path engine's keys, as before the continuous one existed
            level["compared"] = level["compared_engine"]
        level["outputs_equal"] = all(equal)
        if cengine is not None and b > 1 and args.arrival_after > 0 and args.new_tokens > 1:
            # The late request must arrive while the others still decode.
            after = min(args.arrival_after, args.new_tokens - 1)
            level["arrival"] = run_arrival(cengine, batch, args.new_tokens, after)
        if cengine is not None and args.sustained:
            level["sustained"] = sustained = run_sustained(cengine, batch, args.sustained * b)
            print(f"{b:>4} sustained: {sustained['requests']} requests, {b} in flight: "
                  f"{sustained['total_tok_s']:.1f} tok/s over {sustained['total_s']:.3f}s, "
                  f"TTFT P50 {sustained['ttft_p50_s']:.3f}s", flush=True)
        levels.append(level)
        print_level(level)
    return {"levels": levels, "outputs_equal": all(lv["outputs_equal"] for lv in levels)}


def run_arrival(cengine: ContinuousEngine, batch: list[PreparedRequest], new_tokens: int, after: int) -> dict[str, Any]:
    """B-1 rows decode; after `after` of their tokens the B-th row arrives. Its time to first token
    and the decode steps between its arrival and its first token, next to the others' step time."""
    running, late = batch[:-1], with_tokens(batch[-1:], min(new_tokens, 8))
    marks: dict[str, Any] = {}

    class Watched(Detokenizer):
        """Hooks the token stream on the engine thread, so steps and times are read exactly."""

        made = 0

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.late = "arrived_at" in marks  # made inside the submit below
            self.first_running = not self.late and Watched.made == 0
            Watched.made += 1

        def add(self, token: int):
            now = time.perf_counter()
            if self.late:
                if "first_at" not in marks:
                    marks.update(first_at=now, first_step=cengine.decode_steps)
            elif self.first_running:
                marks.setdefault("running_tokens_at", []).append(now)
                if len(self.tokens) + 1 == after:
                    marks.update(arrived_at=now, arrived_step=cengine.decode_steps)
                    marks["late_future"] = cengine.submit(late, lambda chunks: None)
            return super().add(token)

    with _detokenizers(cengine, Watched):
        cengine.submit(running, lambda chunks: None).result()
        marks["late_future"].result()
    step_times = marks["running_tokens_at"]  # one running row's tokens: one per decode step
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    return {
        "running_rows": len(running),
        "arrived_after_tokens": after,
        "ttft_s": marks["first_at"] - marks["arrived_at"],
        "steps_to_first_token": marks["first_step"] - marks["arrived_step"],
        "running_step_s": statistics.median(gaps) if gaps else None,
    }


_HEADER = (f"{'B':>4} {'path':<16}{'TTFT s':>9}{'P50':>7}{'wall s':>9}{'tok/s/seq':>11}{'decode tok/s/seq':>18}"
           f"{'total tok/s':>13}{'ratio':>8}  equal")


def print_level(level: dict[str, Any]) -> None:
    def row(name: str, f: dict, ratio: str = "", equal: str = "") -> str:
        decode = "-" if f["decode_tok_s_per_seq"] is None else f"{f['decode_tok_s_per_seq']:.1f}"
        return (f"{level['batch_size']:>4} {name:<16}{f['ttft_s']:>9.3f}{f['ttft_p50_s']:>7.3f}{f['total_s']:>9.3f}"
                f"{f['tok_s_per_seq']:>11.1f}{decode:>18}{f['total_tok_s']:>13.1f}{ratio:>8}  {equal}")

    print(row("baseline", level["baseline"]), flush=True)
    for key in level["paths"]:
        if key in level:
            ratio = level[f"ratio_{key}_over_baseline"]["total_tok_s"]
            differs = level[f"first_difference_{key}"]
            same = "yes" if level[f"outputs_equal_{key}"] else "NO"
            if differs is not None:
                same += f" (from token {differs})"
            print(row(key, level[key], f"{ratio:.2f}x", same), flush=True)
    if "arrival" in level:
        a = level["arrival"]
        step = "-" if a["running_step_s"] is None else f"{a['running_step_s'] * 1e3:.1f} ms"
        print(f"{'':>4} arrival while {a['running_rows']} decode: first token after {a['ttft_s']:.3f}s, "
              f"{a['steps_to_first_token']} decode steps (their step: {step})", flush=True)


def continuous_paths(args: argparse.Namespace) -> dict[str, str]:
    """Result key -> KV cache format of each continuous engine to build ('continuous' for none,
    'continuous-int8'); none without `--engines continuous`."""
    if "continuous" not in args.engines:
        return {}
    return {"continuous" if kv == "none" else f"continuous-{kv}": kv for kv in args.kv_cache}


def continuous_engine(loaded: LoadedModel, args: argparse.Namespace, kv_cache: str) -> ContinuousEngine:
    """The continuous engine over the same model, with the command line's engine options and `kv_cache`."""
    sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    options = ContinuousEngineSettings(
        max_slots=args.max_slots or max(sizes), cuda_graphs=args.cuda_graphs, compile=args.compile,
        compile_mode=args.compile_mode, warmup_max_len=args.warmup_max_len, decode_attention=args.decode_attention,
        prefix_caching=args.prefix_caching,
        **({"max_prefill_tokens": args.max_prefill_tokens} if args.max_prefill_tokens else {}),
    )
    update: dict[str, Any] = {"continuous": options,
                              "quantization": loaded.settings.quantization.model_copy(update={"kv_cache": kv_cache})}
    if args.max_model_len:
        update["max_model_len"] = args.max_model_len
    return ContinuousEngine(loaded.with_settings(**update))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--new-tokens", "--output-tokens", dest="new_tokens", type=int, default=128)
    parser.add_argument("--image-size", default="448x448", help="WxH of each row's image; 'none' for text only")
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per level and path (2 tokens)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per level and path (median reported)")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--engines", default="generate,continuous",
                        help="engines to run next to the baseline: generate, continuous (comma-separated)")
    parser.add_argument("--max-slots", type=int, default=None,
                        help="continuous: sequences decoding at once (default: largest B)")
    parser.add_argument("--decode-attention", default="auto", choices=["auto", "gather", "triton"],
                        help="continuous: the decode step's attention over the paged cache")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="continuous: tokens per slot (default: the model config's max_model_len)")
    parser.add_argument("--cuda-graphs", action="store_true", help="continuous: capture decode steps in CUDA graphs")
    parser.add_argument("--compile", action="store_true", help="continuous: torch.compile the decode step")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="continuous: keep prefix caching on (off by default: the warm-up and repeats send the "
                             "same rows again, whose prompts would then come from the cache)")
    parser.add_argument("--kv-cache", default="none",
                        help="continuous: the paged KV cache's format, none or int8; 'none,int8' runs one continuous "
                             "engine of each side by side")
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="continuous: padded prompt tokens per prefill pass (default: the settings')")
    parser.add_argument("--warmup-max-len", type=int, default=1024,
                        help="continuous with --cuda-graphs: cache spans captured at load")
    parser.add_argument("--arrival-spread", type=float, default=0.0,
                        help="continuous: a level's rows arrive over this many seconds (0: all at once)")
    parser.add_argument("--arrival-group", type=int, default=3, help="with --arrival-spread: rows per arrival")
    parser.add_argument("--sustained", type=int, default=0, metavar="K",
                        help="continuous: also run K x B requests with B in flight (a closed loop), as "
                             "`vlm-serve bench --concurrency B --num-requests K*B` does")
    parser.add_argument("--arrival-after", type=int, default=16,
                        help="continuous, B > 1: the late request arrives after this many tokens (0: skip)")
    args = parser.parse_args(argv)
    args.engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    if not args.engines <= set(PATHS.values()):
        parser.error("--engines takes generate and/or continuous")
    args.kv_cache = list(dict.fromkeys(k.strip() for k in args.kv_cache.split(",") if k.strip()))
    if not args.kv_cache or not set(args.kv_cache) <= {"none", "int8"}:
        parser.error("--kv-cache takes none and/or int8")
    if args.new_tokens < 1:
        parser.error("--new-tokens must be at least 1")
    if (args.tiny or args.weights != "float") and not args.random_glm46v_shape:
        parser.error("--tiny and --weights go with --random-glm46v-shape")

    with serve_log_on_stderr():
        return run(args, argv)


def kv_cache_of(engine: ContinuousEngine) -> str:
    return engine.runner.loaded.settings.quantization.kv_cache


def kv_bytes_per_token(engine: ContinuousEngine) -> int:
    """Bytes one cached token takes over every layer (keys, values, scales): the cache's own tensors."""
    cache = engine.runner.cache
    return cache.bytes() // (cache.num_blocks * cache.block_size)


@contextmanager
def serve_log_on_stderr():
    """The engines log to Ray Serve's logger (graph captures, compile times, busy periods): show it on
    stderr while the benchmark runs, and no longer (the tests call `main` in their own process)."""
    serve_logger = logging.getLogger("ray.serve")
    handler = logging.StreamHandler()
    level = serve_logger.level
    serve_logger.setLevel(logging.INFO)
    serve_logger.addHandler(handler)
    try:
        yield
    finally:
        serve_logger.removeHandler(handler)
        serve_logger.setLevel(level)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    t0 = time.perf_counter()
    loaded = load_from_arguments(args)
    load_s = time.perf_counter() - t0
    cengines, setup_s = {}, {}
    for key, kv_cache in continuous_paths(args).items():
        t0 = time.perf_counter()
        cengines[key] = continuous_engine(loaded, args, kv_cache)
        setup_s[key] = time.perf_counter() - t0
    cengine = next(iter(cengines.values()), None)  # the one the arrival and sustained loads run on
    engines: dict[str, Engine] = {}
    if "generate" in args.engines:
        engines["engine"] = GenerateEngine(loaded)
    engines.update(cengines)
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else None
    print(f"model {loaded.settings.id} ({params / 1e9:.3f}B parameters, {weight_bytes(model) / 2**30:.2f} GiB "
          f"of weights and buffers, {model.dtype}) on "
          f"{gpu or loaded.device} | torch {torch.__version__} | load {load_s:.1f}s | image {args.image_size} "
          f"| {args.new_tokens} new tokens | prompt {args.prompt!r}", flush=True)
    for key, made in cengines.items():
        steps, cache = made.runner.steps, made.runner.cache
        print(f"{key} engine: {made.runner.slots} slots, {made.runner.max_len}-token sequences, "
              f"{cache.num_blocks} KV blocks of {cache.block_size} (kv_cache {kv_cache_of(made)}: "
              f"{kv_bytes_per_token(made)} bytes per token), cuda_graphs={steps.use_graphs}, "
              f"compile={steps.compiled}, set up in {setup_s[key]:.1f}s ({steps.captured} graphs captured)",
              flush=True)
    print(_HEADER, flush=True)
    approximate = frozenset(key for key, made in cengines.items() if kv_cache_of(made) != "none")
    try:
        result = run_levels(loaded, engines, cengine, args, approximate)
    finally:
        for engine in engines.values():
            engine.close()
    if cengine is not None and args.cuda_graphs and not cengine.runner.steps.use_graphs:
        print("WARNING: the continuous engine ran without CUDA graphs (not CUDA, or a capture failed: see the log)")
    for key in engines:
        if all(key in lv for lv in result["levels"]):
            same = all(lv[f"outputs_equal_{key}"] for lv in result["levels"])
            print(f"greedy outputs of {key} == generate(): " + ("yes, at every level" if same else "NO"))
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": loaded.settings.id,
        "parameters": params,
        "dtype": str(model.dtype),
        "device": gpu or str(loaded.device),
        "torch": torch.__version__,
        "load_s": load_s,
        "new_tokens": args.new_tokens,
        "image_size": args.image_size,
        "prompt": args.prompt,
        "engines": sorted(args.engines),
        **({"continuous_engine": {
            "max_slots": cengine.runner.slots, "max_len": cengine.runner.max_len,
            "cuda_graphs": cengine.runner.steps.use_graphs, "compile": cengine.runner.steps.compiled,
            "compile_mode": args.compile_mode if cengine.runner.steps.compiled else None,
            "setup_s": next(iter(setup_s.values())), "graphs_captured": cengine.runner.steps.captured,
            "kv_cache": {key: {"format": kv_cache_of(made), "bytes_per_token": kv_bytes_per_token(made),
                               "blocks": made.runner.cache.num_blocks} for key, made in cengines.items()},
        }} if cengine is not None else {}),
        **result,
    }
    if loaded.device.type == "cuda":
        report["peak_memory_gib"] = torch.cuda.max_memory_allocated(loaded.device) / 2**30
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"written to {args.json}")
    return 0 if result["outputs_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
