"""Multi-turn image chat through the continuous engine alone (no Ray, no HTTP): TTFT per turn with the
prefix and encoder caches on, against the same turns with them off, in the same process.

    python benchmarks/multi_turn.py --random-glm46v-shape --dtype bfloat16 --cuda-graphs --compile \\
        --json $OUT/multi_turn.json                                   # on a GPU: the production shape
    python benchmarks/multi_turn.py --random-glm46v-shape --tiny --turns 3   # anywhere

`--conversations` conversations of `--turns` turns each, one at a time: turn 1 has one image of
`--image-size` (default 1024x1024) and about `--turn-tokens` tokens of text; every later turn resends
the whole conversation with a fixed assistant answer to the turn before and about `--turn-tokens`
new tokens of text, as a chat client does. Each turn's request generates `--new-tokens` tokens.
Two engines over the same weights run the same turns: caches on (the defaults) and off
(`prefix_caching: false`, `encoder_cache_bytes: 0`). Reported per turn: prompt tokens, tokens taken
from the cache, TTFT P50 of each and their ratio. `vlm-serve bench --multi-turn` does the same
over HTTP against a server.

Where a turn's time goes: `--phases` times the runner's prefill phases (collate, embed, the layers'
pass, the first token's start; each ended by a device synchronisation, which slows the turn a
little) and prints them per turn of the last conversation; `--profile` runs one more conversation and its
last turn, on each engine, under torch.profiler (every thread: the engine's runs on its own) and
prints the operators taking the most device and host time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_model_arguments, load_from_arguments, make_image, parse_size, sync
from engine.continuous.engine import ContinuousEngine
from engine.prompts import Prompter
from serve_app.settings import ContinuousEngineSettings
from serve_app.stage_types import GenerationRequest, ImagePart, PromptMessage, SamplingParams, TextPart

WORDS = ["the", "picture", "shows", "a", "small", "red", "square", "next", "to", "a", "large", "blue", "circle", "on", "a", "plain", "white", "background", "and", "the", "question", "asks", "what", "shapes", "and", "colours", "appear", "where"]


def text_of(tokens: int, tokenizer, seed: int) -> str:
    """About `tokens` tokens of plain words, different for each seed."""
    words, i = [], seed
    while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
        words.extend(WORDS[i % len(WORDS)] for _ in range(8))
        words.append(f"n{i}")
        i += 7
    return " ".join(words)


def conversation_turns(loaded, prompter: Prompter, args, seed: int) -> list:
    """The prepared request of each turn: the whole conversation so far, resent."""
    image = make_image(loaded, parse_size(args.image_size), seed)
    messages, turns = [], []
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for turn in range(args.turns):
        text = TextPart(text_of(args.turn_tokens, prompter.tokenizer, seed * 1000 + turn))
        messages.append(PromptMessage("user", (ImagePart(), text) if turn == 0 else (text,)))
        turns.append(prompter.prepare(GenerationRequest(list(messages), [image], params)))
        answer = text_of(40, prompter.tokenizer, seed * 1000 + turn + 500)
        messages.append(PromptMessage("assistant", (TextPart(answer),)))
    return turns


def ttft(engine: ContinuousEngine, request) -> tuple[float, int]:
    """Seconds from submit to the first chunk with a token, and the prompt tokens the cache held."""
    first = threading.Event()
    seen: dict[str, float | int] = {}

    def on_step(chunks) -> None:
        chunk = chunks[0]
        if chunk is not None and not isinstance(chunk, BaseException) and "t" not in seen and chunk.completion_tokens:
            seen["t"] = time.perf_counter()
            seen["cached"] = getattr(chunk, "cached_tokens", 0)
            first.set()

    started = time.perf_counter()
    future = engine.submit([request], on_step)
    future.result(timeout=600)
    return seen["t"] - started, int(seen.get("cached", 0))


PHASES = [("engine.loader", "LoadedModel", "collate"), ("engine.continuous.runner", "ModelRunner", "_embed"),
          ("engine.models.glm4v.decoder", "Glm4vDecoder", "prefill"),
          ("engine.continuous.runner", "ModelRunner", "_start"), ("engine.continuous.runner", "ModelRunner", "prefill")]


def time_phases(times: dict[str, list[float]]) -> None:
    """Wrap each of PHASES so that its calls' seconds (device synchronised) are appended to times[name]."""
    import functools
    import importlib

    for module, owner, name in PHASES:
        cls = getattr(importlib.import_module(module), owner)
        original = getattr(cls, name)

        def timed(*args, _original=original, _label=f"{owner}.{name}", **kwargs):
            sync(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                sync(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                times.setdefault(_label, []).append(time.perf_counter() - started)

        setattr(cls, name, functools.wraps(original)(timed))


def profiled(engine: ContinuousEngine, request) -> None:
    """One turn under torch.profiler, every thread's operators; the top ones printed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=activities, experimental_config=config) as prof:
        seconds, cached = ttft(engine, request)
    print(f"--- profile: {request.prompt_tokens} prompt tokens, {cached} cached, TTFT {seconds * 1000:.1f} ms "
          "(the whole request: its decode steps too)")
    for key in (["self_cuda_time_total"] if torch.cuda.is_available() else []) + ["cpu_time_total"]:
        print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=300)
    parser.add_argument("--image-size", default="1024x1024")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--phases", action="store_true", help="time the runner's prefill phases (see above)")
    parser.add_argument("--profile", action="store_true", help="profile the last turn (see above)")
    args = parser.parse_args()
    phase_times: dict[str, list[float]] = {}
    if args.phases:
        time_phases(phase_times)
    loaded = load_from_arguments(args)
    prompter = Prompter(loaded.settings, loaded.processor)
    engines = {}
    for name, cached in (("cache on", True), ("cache off", False)):
        options = ContinuousEngineSettings(max_slots=4, cuda_graphs=args.cuda_graphs, compile=args.compile,
                                           warmup_max_len=1024, prefix_caching=cached,
                                           **({} if cached else {"encoder_cache_bytes": 0}))
        engines[name] = ContinuousEngine(loaded.with_settings(continuous=options))
    # A warm-up conversation on each (its own seed: nothing of it is in the measured ones' keys).
    for engine in engines.values():
        for request in conversation_turns(loaded, prompter, args, seed=999):
            ttft(engine, request)
    rows: list[dict] = []
    for c in range(args.conversations):
        turns = conversation_turns(loaded, prompter, args, seed=c)
        for turn, request in enumerate(turns):
            for name, engine in engines.items():
                phase_times.clear()
                seconds, cached = ttft(engine, request)
                rows.append({"conversation": c, "turn": turn + 1, "engine": name, "ttft_s": seconds,
                             "prompt_tokens": request.prompt_tokens, "cached_tokens": cached})
                if args.phases and c == args.conversations - 1:
                    spent = "  ".join(f"{label} {sum(v) * 1000:.1f}" for label, v in phase_times.items())
                    print(f"turn {turn + 1} {name}: TTFT {seconds * 1000:.1f} ms | phases, ms: {spent}")
    if args.profile:  # one more conversation, its last turn profiled
        turns = conversation_turns(loaded, prompter, args, seed=args.conversations)
        for engine in engines.values():
            for request in turns[:-1]:
                ttft(engine, request)
            profiled(engine, turns[-1])
    summary = []
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT on':>9} {'TTFT off':>9} {'ratio':>6}")
    for turn in range(1, args.turns + 1):
        on = [r for r in rows if r["turn"] == turn and r["engine"] == "cache on"]
        off = [r for r in rows if r["turn"] == turn and r["engine"] == "cache off"]
        p50_on, p50_off = statistics.median(r["ttft_s"] for r in on), statistics.median(r["ttft_s"] for r in off)
        entry = {"turn": turn, "prompt_tokens": statistics.median(r["prompt_tokens"] for r in on),
                 "cached_tokens": statistics.median(r["cached_tokens"] for r in on),
                 "ttft_on_s": p50_on, "ttft_off_s": p50_off, "ratio": p50_on / p50_off}
        summary.append(entry)
        print(f"{turn:4d} {entry['prompt_tokens']:7.0f} {entry['cached_tokens']:7.0f} {p50_on:9.3f} {p50_off:9.3f} "
              f"{entry['ratio']:6.2f}")
    for engine in engines.values():
        engine.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu"
        args.json.write_text(json.dumps({"device": device, "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows, "summary": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()
