"""`vlm-serve bench`: load a RUNNING server through the official `openai` client and measure it.

    vlm-serve bench --base-url http://127.0.0.1:8000/v1 --num-requests 64 --concurrency 8 \\
        --image-size 448x448 --output-tokens 128 --out bench.json
    vlm-serve bench --request-rate 4 --num-requests 200 --image-size 224x224,448x448 ...

Every request streams (`stream_options.include_usage`) and asks for exactly `--output-tokens`
tokens through the server's vLLM-style extensions `min_tokens` and `ignore_eos`, so runs are
comparable. Measured per request: time to first token (TTFT: request sent -> first content chunk),
inter-token latency (ITL: gaps between consecutive content chunks), time per output token (TPOT:
(end-to-end - TTFT) / (completion tokens - 1)) and end-to-end latency. The run reports P50/P95/P99
of each, requests/s and output tokens/s (from `usage`), and counts errors by kind without stopping.

Multi-turn mode (`--multi-turn`): `--num-requests` conversations of `--turns` turns, at most
`--concurrency` of them in flight. Turn 1 sends `--images-per-request` images (default size
1024x1024) and about `--turn-tokens` tokens of text; every later turn appends the model's answer and
a new user message of about as many tokens and sends the whole conversation again, as chat clients
do. Reported per turn: TTFT P50, prompt tokens, and the prefix cache's hit rate where the server
reports `usage.prompt_tokens_details.cached_tokens`. `--uncached-baseline` then replays the same
conversations with a fresh `cache_salt` on every request (no request can reuse another's cached
prefix or image features) and reports each turn's TTFT against that baseline, in the same call.

    vlm-serve bench --multi-turn --turns 6 --num-requests 16 --concurrency 4 --uncached-baseline

The statistics are pure functions (`percentile`, `summarize`, `aggregate`, `per_turn`) so they are
tested alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# ---- pure statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, min, P50, P95, P99 and max of `values` (None where there are none)."""
    values = list(values)
    return {
        "count": len(values),
        "mean": (sum(values) / len(values)) if values else None,
        "min": min(values) if values else None,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


@dataclass
class RequestResult:
    """What one request did. Times are seconds on the client's monotonic clock."""

    index: int
    ok: bool = False
    error: str | None = None  # the error's kind ("http_503", "timeout", "connection", ...)
    error_message: str | None = None
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    content_chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    finish_reason: str | None = None
    text_chars: int = 0
    turn: int | None = None  # multi-turn mode: the turn's index in its conversation (0: the first)
    answer: str = ""  # the streamed text (multi-turn mode appends it to the conversation; not recorded)

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    def record(self) -> dict[str, Any]:
        """The per-request line written to JSON (ITL gaps summarised, not listed)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("itls", "start", "end", "answer")}
        out["e2e_s"] = self.e2e
        out["tpot_s"] = self.tpot
        out["itl_mean_s"] = (sum(self.itls) / len(self.itls)) if self.itls else None
        return out


def aggregate(results: Sequence[RequestResult], duration_s: float, expected_tokens: int | None = None) -> dict[str, Any]:
    """Run-level figures from the requests' results and the run's wall time."""
    good = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown" for r in results if not r.ok)
    completion = sum(r.completion_tokens or 0 for r in good)
    prompt = sum(r.prompt_tokens or 0 for r in good)
    summary: dict[str, Any] = {
        "requests": len(results),
        "successes": len(good),
        "failures": len(results) - len(good),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "requests_per_s": (len(good) / duration_s) if duration_s > 0 else None,
        "output_tokens_per_s": (completion / duration_s) if duration_s > 0 else None,
        "total_output_tokens": completion,
        "total_prompt_tokens": prompt,
        "missing_usage": sum(1 for r in good if r.completion_tokens is None),
        "ttft_s": summarize([r.ttft for r in good if r.ttft is not None]),
        "itl_s": summarize([gap for r in good for gap in r.itls]),
        "tpot_s": summarize([t for r in good if (t := r.tpot) is not None]),
        "e2e_s": summarize([r.e2e for r in good]),
    }
    if expected_tokens is not None:
        summary["wrong_token_count"] = sum(1 for r in good if r.completion_tokens != expected_tokens)
    return summary


def per_turn(results: Sequence[RequestResult]) -> list[dict[str, Any]]:
    """Multi-turn figures per turn index: requests, TTFT P50, mean prompt tokens, and the share of
    prompt tokens the prefix cache held (None unless every request of the turn reported cached_tokens)."""
    turns = sorted({r.turn for r in results if r.turn is not None})
    out = []
    for turn in turns:
        good = [r for r in results if r.turn == turn and r.ok]
        prompt = sum(r.prompt_tokens or 0 for r in good)
        cached = None if not good or any(r.cached_tokens is None for r in good) else sum(r.cached_tokens for r in good)
        out.append({
            "turn": turn + 1,
            "requests": len(good),
            "ttft_p50_s": percentile([r.ttft for r in good if r.ttft is not None], 50),
            "prompt_tokens_mean": (prompt / len(good)) if good else None,
            "cached_tokens_mean": None if cached is None else cached / len(good),
            "prefix_hit_rate": None if cached is None or not prompt else cached / prompt,
        })
    return out


def format_turns(turns: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] | None = None) -> str:
    """A per-turn table; with `baseline` (the same turns without caching), each TTFT against its own."""

    def shown(value: float | None, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}{unit}"

    header = f"{'turn':<6}{'n':>5}{'TTFT P50 (ms)':>15}{'prompt tok':>12}{'cached tok':>12}{'hit rate':>10}"
    if baseline is not None:
        header += f"{'uncached (ms)':>15}{'ratio':>8}"
    lines = [header]
    base = {t["turn"]: t["ttft_p50_s"] for t in baseline or []}
    for t in turns:
        line = (f"{t['turn']:<6}{t['requests']:>5}{shown(t['ttft_p50_s'], 1000):>15}"
                f"{shown(t['prompt_tokens_mean'], digits=0):>12}{shown(t['cached_tokens_mean'], digits=0):>12}"
                f"{shown(t['prefix_hit_rate'], 100, unit='%'):>10}")
        if baseline is not None:
            other = base.get(t["turn"])
            ratio = t["ttft_p50_s"] / other if other and t["ttft_p50_s"] is not None else None
            line += f"{shown(other, 1000):>15}{shown(ratio, digits=2):>8}"
        lines.append(line)
    return "\n".join(lines)


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the latency figures (milliseconds) and the throughput lines."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    lines = [f"{'metric (ms)':<14}{'mean':>10}{'P50':>10}{'P95':>10}{'P99':>10}{'max':>10}{'n':>8}"]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("end-to-end", "e2e_s")):
        s = summary[key]
        lines.append(
            f"{name:<14}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}{ms(s['p99']):>10}"
            f"{ms(s['max']):>10}{s['count']:>8}"
        )
    rps, tps = summary["requests_per_s"], summary["output_tokens_per_s"]
    lines.append(
        f"requests: {summary['successes']}/{summary['requests']} ok in {summary['duration_s']:.2f} s"
        f" | {'-' if rps is None else f'{rps:.2f}'} req/s"
        f" | {'-' if tps is None else f'{tps:.1f}'} output tok/s"
        f" | {summary['total_output_tokens']} output, {summary['total_prompt_tokens']} prompt tokens"
    )
    if summary["errors"]:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in summary["errors"].items()))
    if summary.get("wrong_token_count"):
        lines.append(f"WARNING: {summary['wrong_token_count']} answers did not have the requested token count")
    if summary.get("missing_usage"):
        lines.append(f"WARNING: {summary['missing_usage']} answers came without usage")
    return "\n".join(lines)


def parse_image_sizes(values: Iterable[str] | None) -> list[tuple[int, int]]:
    """['448x448', '224x224,64x32'] -> [(448, 448), (224, 224), (64, 32)]."""
    sizes: list[tuple[int, int]] = []
    for value in values or []:
        for item in value.split(","):
            item = item.strip().lower()
            if not item:
                continue
            try:
                w, h = (int(v) for v in item.split("x"))
            except ValueError:
                raise argparse.ArgumentTypeError(f"image size {item!r} is not WIDTHxHEIGHT") from None
            if w < 1 or h < 1:
                raise argparse.ArgumentTypeError(f"image size {item!r} must be positive")
            sizes.append((w, h))
    return sizes


def poisson_delays(rate: float, count: int, seed: int) -> list[float]:
    """Gaps between `count` arrivals of a Poisson process of `rate` per second (inf: all at once)."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(count)]


def error_kind(exc: BaseException) -> str:
    """A short, countable name for what went wrong (HTTP status when there is one)."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return f"http_{status}"
    name = type(exc).__name__
    return {"APITimeoutError": "timeout", "APIConnectionError": "connection", "TimeoutError": "timeout"}.get(name, name)


# ---- images and requests -----------------------------------------------------------------------


def make_image_url(size: tuple[int, int], seed: int, fmt: str = "png") -> str:
    """A data URL of a `size` image of random coloured blocks (unique per seed, so no cache hits)."""
    from PIL import Image

    rng = random.Random(seed)
    blocks = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(256) for _ in range(8 * 8 * 3)))
    image = blocks.resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if fmt == "jpeg" else "PNG", **({"quality": 90} if fmt == "jpeg" else {}))
    mime = "image/jpeg" if fmt == "jpeg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def build_messages(prompt: str, image_urls: Sequence[str]) -> list[dict[str, Any]]:
    if not image_urls:
        return [{"role": "user", "content": prompt}]
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


@dataclass(frozen=True)
class Workload:
    model: str
    prompt: str
    output_tokens: int
    temperature: float
    images: list[list[str]]  # image data URLs of each request (made before the clock starts)


async def run_one(client, work: Workload, index: int, timeout_s: float, messages: list[dict[str, Any]] | None = None,
                  cache_salt: str | None = None) -> RequestResult:
    """One streamed request (the workload's prompt and images, or `messages`); never raises (errors
    become the result's `error`)."""
    result = RequestResult(index=index)
    n = work.output_tokens
    result.start = time.perf_counter()
    last: float | None = None
    extra: dict[str, Any] = {"ignore_eos": True, "min_tokens": n}
    if cache_salt is not None:
        extra["cache_salt"] = cache_salt
    try:
        stream = await client.chat.completions.create(
            model=work.model,
            messages=messages or build_messages(work.prompt, work.images[index % len(work.images)] if work.images
                                                else []),
            max_tokens=n,
            temperature=work.temperature,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
            timeout=timeout_s,
        )
        answer: list[str] = []
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.completion_tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                result.cached_tokens = None if details is None else details.cached_tokens
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    if last is None:
                        result.ttft = now - result.start
                    else:
                        result.itls.append(now - last)
                    last = now
                    result.content_chunks += 1
                    result.text_chars += len(choice.delta.content)
                    answer.append(choice.delta.content)
                if choice.finish_reason is not None:
                    result.finish_reason = choice.finish_reason
        result.answer = "".join(answer)
        result.ok = True
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none ends the run
        result.error = error_kind(exc)
        result.error_message = str(exc)[:500]
    result.end = time.perf_counter()
    return result


async def run_load(
    client,
    work: Workload,
    num_requests: int,
    concurrency: int | None,
    request_rate: float,
    seed: int,
    timeout_s: float,
    progress: bool,
) -> tuple[list[RequestResult], float]:
    """Send `num_requests`; at most `concurrency` in flight, arrivals Poisson at `request_rate`/s."""
    from tqdm.asyncio import tqdm

    bar = tqdm(total=num_requests, desc="requests", unit="req", disable=not progress, file=sys.stderr)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    results: list[RequestResult] = []

    async def one(index: int) -> None:
        if limit is None:
            results.append(await run_one(client, work, index, timeout_s))
        else:
            async with limit:
                results.append(await run_one(client, work, index, timeout_s))
        bar.update(1)

    started = time.perf_counter()
    tasks = []
    for index, delay in enumerate(poisson_delays(request_rate, num_requests, seed)):
        if index and delay:
            await asyncio.sleep(delay)
        # A request's clock starts when it gets a slot (run_one), not while it waits for one.
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - started
    bar.close()
    return sorted(results, key=lambda r: r.index), duration


# ---- multi-turn conversations ----------------------------------------------------------------------

_WORDS = ("circle", "square", "red", "blue", "green", "large", "small", "left", "right", "above", "below",
          "picture", "shape", "colour", "count", "between", "corner", "edge", "middle", "bright", "dark",
          "pattern", "line", "dot", "next", "to", "the", "a", "of", "and", "with", "is", "in", "on")


def turn_text(seed: int, conversation: int, turn: int, tokens: int) -> str:
    """A user message of about `tokens` tokens (words of a fixed list, about one token each), its own for
    every (seed, conversation, turn): conversations share no text, so only a conversation's own
    earlier turns can be cached."""
    rng = random.Random(f"{seed}/{conversation}/{turn}")
    words = " ".join(rng.choice(_WORDS) for _ in range(max(1, tokens - 12)))
    return f"Conversation {conversation}, turn {turn + 1}: {words}. What do you make of this?"


def turn_message(work: Workload, conversation: int, turn: int, turn_tokens: int, seed: int) -> dict[str, Any]:
    """Turn `turn`'s user message: its text, after the conversation's images on the first turn."""
    text = turn_text(seed, conversation, turn, turn_tokens)
    if turn or not work.images:
        return {"role": "user", "content": text}
    return build_messages(text, work.images[conversation % len(work.images)])[0]


async def run_conversation(client, work: Workload, conversation: int, turns: int, turn_tokens: int, seed: int,
                           timeout_s: float, salted: bool = False) -> list[RequestResult]:
    """One conversation, turn after turn, each sending the whole conversation so far; a failed turn ends
    it. `salted`: every request with a fresh cache_salt (nothing cached is shared)."""
    messages: list[dict[str, Any]] = []
    results = []
    for turn in range(turns):
        messages.append(turn_message(work, conversation, turn, turn_tokens, seed))
        result = await run_one(client, work, conversation * turns + turn, timeout_s, list(messages),
                               uuid.uuid4().hex if salted else None)
        result.turn = turn
        results.append(result)
        if not result.ok:
            break
        messages.append({"role": "assistant", "content": result.answer})
    return results


async def run_conversations(client, work: Workload, args: argparse.Namespace, concurrency: int, first: int,
                            count: int, salted: bool = False) -> tuple[list[RequestResult], float]:
    """Conversations first..first+count-1, at most `concurrency` at once; their requests' results."""
    from tqdm.asyncio import tqdm

    bar = tqdm(total=count, desc="conversations", unit="conv", disable=args.no_progress, file=sys.stderr)
    limit = asyncio.Semaphore(concurrency)

    async def one(conversation: int) -> list[RequestResult]:
        async with limit:
            done = await run_conversation(client, work, conversation, args.turns, args.turn_tokens, args.seed,
                                          args.timeout, salted)
        bar.update(1)
        return done

    started = time.perf_counter()
    results = await asyncio.gather(*(one(first + i) for i in range(count)))
    duration = time.perf_counter() - started
    bar.close()
    return [r for conversation in results for r in conversation], duration


async def _bench_conversations(client, args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Multi-turn mode (see the module docstring)."""
    sizes = parse_image_sizes(args.image_size) or [(1024, 1024)]
    total = args.num_requests + args.warmup
    images = [[make_image_url(sizes[(i * args.images_per_request + j) % len(sizes)], i * 1000 + j, args.image_format)
               for j in range(args.images_per_request)] for i in range(total)] if args.images_per_request else []
    work = Workload(model, "", args.output_tokens, args.temperature, images)
    concurrency = args.concurrency or 1
    if args.warmup:  # not counted: the first turns of conversations of their own
        await asyncio.gather(*(run_one(client, work, 0, args.timeout, [turn_message(work, c, 0, args.turn_tokens,
                                                                                   args.seed)])
                               for c in range(args.num_requests, total)))
    results, duration = await run_conversations(client, work, args, concurrency, 0, args.num_requests)
    summary = aggregate(results, duration, expected_tokens=args.output_tokens)
    summary["turns"] = per_turn(results)
    report: dict[str, Any] = {"requests": [r.record() for r in results]}
    if args.uncached_baseline:
        # The same conversations (the same images and texts) again, nothing shared between requests.
        baseline, baseline_duration = await run_conversations(client, work, args, concurrency, 0, args.num_requests,
                                                              salted=True)
        summary["uncached"] = {"turns": per_turn(baseline),
                               **aggregate(baseline, baseline_duration, expected_tokens=args.output_tokens)}
        report["uncached_requests"] = [r.record() for r in baseline]
    return {
        "config": {
            "base_url": args.base_url, "model": model, "multi_turn": True, "conversations": args.num_requests,
            "turns": args.turns, "turn_tokens": args.turn_tokens, "concurrency": concurrency,
            "image_sizes": [f"{w}x{h}" for w, h in sizes], "images_per_request": args.images_per_request,
            "image_format": args.image_format, "output_tokens": args.output_tokens,
            "temperature": args.temperature, "warmup": args.warmup, "seed": args.seed,
            "uncached_baseline": args.uncached_baseline,
        },
        "summary": summary,
        **report,
    }


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    try:
        try:
            model = args.model or (await client.models.list()).data[0].id
        except Exception as exc:  # noqa: BLE001 - nothing to measure without a model name
            raise SystemExit(f"cannot list the models at {args.base_url}: {error_kind(exc)}: {exc}") from None
        if args.multi_turn:
            return await _bench_conversations(client, args, model)
        sizes = parse_image_sizes(args.image_size) or [(448, 448)]
        total = args.num_requests + args.warmup
        per_request = args.images_per_request
        # Request i uses sizes[(i * per_request + j) % len(sizes)]; distinct pixels per request
        # unless --same-image, so the preprocessor's content cache does not flatter the run.
        images = [
            [
                make_image_url(sizes[(i * per_request + j) % len(sizes)], 0 if args.same_image else i * 1000 + j,
                               args.image_format)
                for j in range(per_request)
            ]
            for i in range(total)
        ] if per_request else []
        work = Workload(model, args.prompt, args.output_tokens, args.temperature, images)

        concurrency = args.concurrency if args.concurrency else None
        # Not counted; as many at once as the run will have in flight, so that it starts on open
        # keep-alive connections, as a client under steady load does (and as the engine benchmark,
        # warmed at each batch size, has no connections to open).
        width = max(1, min(concurrency or 1, args.warmup))
        for first in range(0, args.warmup, width):
            await asyncio.gather(*(run_one(client, work, args.num_requests + i, args.timeout)
                                   for i in range(first, min(first + width, args.warmup))))

        rate = args.request_rate if args.request_rate is not None else math.inf
        if concurrency is None and math.isinf(rate):
            concurrency = 1
        results, duration = await run_load(
            client, work, args.num_requests, concurrency, rate, args.seed, args.timeout, not args.no_progress
        )
    finally:
        await client.close()
    summary = aggregate(results, duration, expected_tokens=args.output_tokens)
    return {
        "config": {
            "base_url": args.base_url,
            "model": model,
            "num_requests": args.num_requests,
            "concurrency": concurrency,
            "request_rate": None if math.isinf(rate) else rate,
            "image_sizes": [f"{w}x{h}" for w, h in sizes],
            "images_per_request": per_request,
            "image_format": args.image_format,
            "same_image": args.same_image,
            "output_tokens": args.output_tokens,
            "temperature": args.temperature,
            "prompt": args.prompt,
            "warmup": args.warmup,
            "seed": args.seed,
        },
        "summary": summary,
        "requests": [r.record() for r in results],
    }


def _run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and args.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1")
    if args.request_rate is not None and args.request_rate <= 0:
        raise SystemExit("--request-rate must be positive")
    if args.multi_turn and args.turns < 1:
        raise SystemExit("--turns must be at least 1")
    report = asyncio.run(_bench(args))
    c = report["config"]
    if c.get("multi_turn"):
        _print_conversations(report)
        return _write(report, args.out)
    mode = f"concurrency {c['concurrency']}" if c["request_rate"] is None else (
        f"request rate {c['request_rate']}/s" + (f", concurrency cap {c['concurrency']}" if c["concurrency"] else "")
    )
    print(
        f"model {c['model']} at {c['base_url']} | {c['num_requests']} requests, {mode} | "
        f"{c['images_per_request']} image(s) of {','.join(c['image_sizes']) if c['images_per_request'] else '-'}"
        f" | {c['output_tokens']} output tokens"
    )
    print(format_table(report["summary"]))
    return _write(report, args.out)


def _print_conversations(report: dict[str, Any]) -> None:
    c, summary = report["config"], report["summary"]
    print(f"model {c['model']} at {c['base_url']} | {c['conversations']} conversations of {c['turns']} turns, "
          f"concurrency {c['concurrency']} | turn 1: {c['images_per_request']} image(s) of "
          f"{','.join(c['image_sizes']) if c['images_per_request'] else '-'} | ~{c['turn_tokens']} tokens of text "
          f"a turn | {c['output_tokens']} output tokens")
    print(format_table(summary))
    uncached = summary.get("uncached")
    print(format_turns(summary["turns"], uncached["turns"] if uncached else None))
    if uncached and uncached["failures"]:
        print(f"WARNING: {uncached['failures']} requests of the uncached baseline failed")


def _write(report: dict[str, Any], out: str | None) -> int:
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"written to {out}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    parser.add_argument("--api-key", default="not-needed-when-open")
    parser.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests in flight at once (closed loop); with --request-rate, a cap")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="Poisson arrivals per second (open loop); default: as fast as --concurrency allows")
    parser.add_argument("--image-size", action="append", default=None, metavar="WxH",
                        help="image size(s), repeatable or comma-separated; cycled over requests (default 448x448)")
    parser.add_argument("--images-per-request", type=int, default=1, help="0: text-only requests")
    parser.add_argument("--image-format", choices=["png", "jpeg"], default="png")
    parser.add_argument("--same-image", action="store_true",
                        help="send the same pixels every time (the server's image cache will hit)")
    parser.add_argument("--output-tokens", type=int, default=128,
                        help="exact completion length (max_tokens, min_tokens and ignore_eos)")
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=1,
                        help="requests sent first, not counted, up to --concurrency at once")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrival times")
    parser.add_argument("--out", default=None, help="write the figures and per-request records as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--multi-turn", action="store_true",
                        help="replay conversations: --num-requests conversations of --turns turns, each turn "
                        "sending the whole conversation again (default image size then 1024x1024)")
    parser.add_argument("--turns", type=int, default=6, help="multi-turn mode: turns per conversation")
    parser.add_argument("--turn-tokens", type=int, default=300,
                        help="multi-turn mode: about this many tokens of text in each user message")
    parser.add_argument("--uncached-baseline", action="store_true",
                        help="multi-turn mode: replay the conversations again with a fresh cache_salt on every "
                        "request, and report each turn's TTFT against that")


def register(subparsers) -> argparse.ArgumentParser:
    """Adds `bench` to `vlm-serve`'s subcommands."""
    parser = subparsers.add_parser("bench", help="benchmark a running server through the openai client",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-serve bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
