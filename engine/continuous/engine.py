"""ContinuousEngine: iteration-level batching over a slot KV cache, driven by one engine thread.

Where `Engine.generate_batch` runs a batch through one `generate()` call (arrivals wait for the
whole batch to end; finished rows keep their place), this engine keeps up to `max_slots`
sequences in a preallocated cache and runs one loop on its own thread. Each iteration:
1. admits waiting requests into free slots: one prefill pass over the new prompts (vision
   encoder once per image) writes their keys/values into their slots; first tokens are sampled;
2. launches one decode step for every live sequence (a CUDA graph replay on a GPU, when enabled);
3. while that step runs on the device, reads the tokens of the previous step (the one host-device
   synchronisation per step), detokenizes them and streams the text (`_RowState.advance`: the
   same stop / max_tokens / min_tokens / cancellation rules as the generate path);
4. frees the slots of sequences that finished or whose client went away, moving the last live
   sequence into each hole so the live ones stay in slots 0..n-1.
A request that arrives while others decode therefore starts at the next iteration, and a finished
one leaves at once. Because step N+1 is launched before step N's tokens are read, a sequence that
ends at step N computes one extra token, which is dropped.

Requests arrive as groups (`submit`, one group per `@serve.batch` call, with a callback that gets
one entry per request, as `generate_batch`'s does); a group's future completes when all its
requests are done, or fails with the engine's error.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.continuous.graphs import StepRunner
from engine.continuous.sampling import RowParams, sample
from engine.continuous.slots import SlotKVCache, SlotState
from engine.generate import engine as base
from engine.generate.engine import Engine, PreparedRequest, StepCallback
from engine.models.glm4v.decoder import Glm4vDecoder, Prefill, unsupported_reason
from serve_app.stage_types import GenerationChunk

logger = logging.getLogger("ray.serve")


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@dataclass
class BusyPeriod:
    """What the engine did from becoming busy to going idle, logged then: where a burst's time went
    (decode steps, prefill passes between them, the host's pace), to read next to the engine
    benchmark's figures for the same workload."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0  # streamed to rows
    # One entry per prefill pass: when it began (seconds after `started`), its prompts, its tokens
    # (padded, as run) and its host seconds (after which the device may still be busy).
    passes: list[tuple[float, int, int, float]] = field(default_factory=list)
    step_gaps: list[float] = field(default_factory=list)  # between launches with no prefill between
    _last_launch: float | None = None
    _prefilled_since: bool = False

    def prefilled(self, prompts: int, tokens: int, seconds: float) -> None:
        self.passes.append((time.perf_counter() - seconds - self.started, prompts, tokens, seconds))
        self._prefilled_since = True

    def launched(self) -> None:
        now = time.perf_counter()
        if self._last_launch is not None and not self._prefilled_since:
            self.step_gaps.append(now - self._last_launch)
        self._last_launch, self._prefilled_since = now, False
        self.steps += 1

    def summary(self) -> str:
        gaps = sorted(self.step_gaps)
        pace = f"{gaps[len(gaps) // 2] * 1e3:.1f} ms median, {gaps[int(len(gaps) * 0.9)] * 1e3:.1f} ms P90" if gaps else "-"
        prompts, tokens, host = (sum(p[i] for p in self.passes) for i in (1, 2, 3))
        each = ", ".join(f"+{at:.3f}s {n} in {s * 1e3:.0f} ms" for at, n, _, s in self.passes)
        return (f"Busy {time.perf_counter() - self.started:.3f}s: {self.tokens} tokens out, {self.steps} decode steps "
                f"(between launches without a prefill: {pace}), {len(self.passes)} prefill passes of {prompts} prompts "
                f"({tokens} tokens, {host:.3f}s on the host: {each})")


@dataclass(eq=False)
class _Group:
    """One `submit` call: its callback and its future."""

    on_step: StepCallback
    future: Future
    rows: list[_SlotRow] = field(default_factory=list)
    open_rows: int = 0
    failed: bool = False

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass(eq=False)
class _SlotRow(base._RowState):
    group: _Group | None = None
    index: int = 0  # position in its group (where its chunks go in the callback's list)
    cache_len: int = 0  # tokens in its slot once every launched step has run
    closed: bool = False  # counted off its group


@dataclass(eq=False)
class _Pending:
    """Tokens on their way to the host: output i belongs to rows[i]."""

    rows: list[_SlotRow]
    tokens: torch.Tensor  # on the host (pinned on CUDA), filled when `ready` has passed
    ready: Any = None  # torch.cuda.Event, None on the CPU

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class ContinuousEngine(Engine):
    """The generate path's interface (prepare, generate_batch, probe, busy) on the continuous loop."""

    continuous = True

    def __init__(self, settings, model, processor, device: torch.device) -> None:
        super().__init__(settings, model, processor, device)
        reason = unsupported_reason(model, settings.quantization.kv_cache)
        if reason is not None:
            raise ValueError(f"The continuous engine cannot run this model: {reason}")
        self.options = settings.continuous
        text = model.config.get_text_config(decoder=True)
        attention = model.model.language_model.layers[0].self_attn
        shape = (text.num_hidden_layers, attention.num_key_value_heads, settings.max_model_len, attention.head_dim)
        self.slots = self._slots_that_fit(shape, model.dtype, device)
        self.cache = SlotKVCache(shape[0], self.slots, shape[1], shape[2], shape[3], model.dtype, device)
        self.state = SlotState(self.slots, device)
        self.decoder = Glm4vDecoder(model, self.cache, self.state, self.eos_token_ids, device)
        self.runner = StepRunner(self.decoder, self.options, device)
        self.buckets = sorted({b for b in self.options.batch_buckets if b < self.slots} | {self.slots})
        self.decode_steps = 0  # read by benchmarks: decode steps launched so far
        self._period: BusyPeriod | None = None
        self._live: list[_SlotRow] = []  # index = slot
        self._waiting: deque[_SlotRow] = deque()
        self._pending: deque[_Pending] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._seeds = random.Random()
        if device.type == "cuda" and self.options.switch_interval_s is not None:
            # The engine thread must relaunch the GPU every decode step (~9 ms on the GLM-4.6V shape).
            # Python hands the GIL over only every 5 ms by default, so while the replica's event loop
            # streams 32 sequences' tokens each step could start up to 5 ms late.
            sys.setswitchinterval(self.options.switch_interval_s)
        self._thread = threading.Thread(target=self._loop, name="continuous-engine", daemon=True)
        self._thread.start()
        logger.info("Continuous engine: %d slots x %d tokens (KV cache %.2f GiB), buckets %s, cuda_graphs=%s, "
                    "compile=%s", self.slots, self.cache.max_len, self.cache.bytes() / 2**30, self.buckets,
                    self.runner.use_graphs, self.runner.compiled)
        if self.runner.use_graphs:
            self.call(self._warmup)

    def _slots_that_fit(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> int:
        """max_slots, or fewer where a GPU's free memory cannot hold that many full-length slots."""
        wanted = self.options.max_slots
        if device.type != "cuda":
            return wanted
        layers, kv_heads, max_len, head_dim = shape
        positions = max_len + 1  # SlotKVCache's spare position included
        per_slot = 2 * layers * kv_heads * positions * head_dim * torch.empty((), dtype=dtype).element_size()
        free, _ = torch.cuda.mem_get_info(device)
        fits = int(free * self.options.kv_cache_memory_fraction // per_slot)
        if fits < wanted:
            logger.warning("The KV cache fits %d slots of %d tokens (%.2f GiB each) in %.0f%% of the %.1f GiB free, "
                           "not max_slots=%d; lower max_model_len for more", fits, max_len, per_slot / 2**30,
                           100 * self.options.kv_cache_memory_fraction, free / 2**30, wanted)
        if fits < 1:
            raise ValueError(f"Not even one KV cache slot of {max_len} tokens fits in the free GPU memory")
        return min(wanted, fits)

    @classmethod
    def from_engine(cls, engine: Engine) -> ContinuousEngine:
        """The continuous engine over an already loaded generate-path engine's model."""
        return cls(engine.settings, engine.model, engine.processor, engine.device)

    # ---- the interface the server and benchmarks use ------------------------------------------

    def submit(self, batch: list[PreparedRequest], on_step: StepCallback) -> Future:
        """Queue `batch`; `on_step` gets each iteration's new chunks (one entry per request, None:
        nothing new) from the engine thread. The future completes when every request is done."""
        for request in batch:
            if request.prompt_tokens + request.max_tokens > self.cache.max_len:
                raise ValueError(f"{request.prompt_tokens} prompt + {request.max_tokens} new tokens do not fit a "
                                 f"{self.cache.max_len}-token slot")
        group = _Group(on_step, Future(), open_rows=len(batch))
        # The detokenizer class is looked up on the module at call time, so benchmarks can observe it.
        rows = [_SlotRow(request, base._Detokenizer(self.tokenizer, request.sampling.stop), group=group, index=i)
                for i, request in enumerate(batch)]
        group.rows = rows
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if not self.busy:
                self.last_step_at = time.monotonic()
            self._waiting.extend(rows)
            self.busy = True
            self._wake.notify()
        if not rows:
            group.future.set_result(None)
        return group.future

    def generate_batch(self, batch: list[PreparedRequest], on_step: StepCallback) -> None:
        """Run `batch` to completion (blocking), as `Engine.generate_batch` does."""
        self.submit(batch, on_step).result()

    def probe(self) -> None:
        """One tiny forward pass, on the engine thread (so never concurrently with a step)."""
        self.call(super().probe)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between iterations and return its result (blocking)."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._jobs.append((fn, future))
            self._wake.notify()
        return future.result()

    def close(self) -> None:
        """Stop the engine thread (requests still queued fail)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def live(self) -> int:
        return len(self._live)

    # ---- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._closed or self._jobs or self._waiting or self._live or self._pending):
                        self.busy = False
                        self._wake.wait()
                    if self._closed:
                        break
                    jobs, self._jobs = list(self._jobs), deque()
                for fn, future in jobs:
                    self._run_job(fn, future)
                try:
                    self._iterate()
                except Exception as error:  # a broken step: every request in flight fails with it
                    logger.exception("The continuous engine failed a step")
                    self._fail_all(error)
        self._fail_all(RuntimeError("the engine was closed"))

    @staticmethod
    def _run_job(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            future.set_exception(error)

    def _iterate(self) -> None:
        if self._period is None:
            self._period = BusyPeriod()
        self._admit()
        launched = self._launch()
        # Everything before the step just launched is read now, while that step runs.
        while len(self._pending) > (1 if launched else 0):
            self._process(self._pending.popleft())
        self._release_finished()
        self.last_step_at = time.monotonic()
        with self._wake:
            self.busy = bool(self._waiting or self._live or self._pending)
        if not self.busy:
            if self._period.steps:
                logger.info(self._period.summary())
            self._period = None

    # ---- admission and prefill ------------------------------------------------------------------

    def _take_arrivals(self) -> list[_SlotRow]:
        """Waiting rows that fit the free slots and the prefill budget (at least one), oldest first."""
        taken: list[_SlotRow] = []
        width = 0
        with self._wake:
            self._drop_abandoned()
            while self._waiting and len(self._live) + len(taken) < self.slots:
                wider = max(width, self._waiting[0].request.prompt_tokens)
                if taken and wider * (len(taken) + 1) > self.options.max_prefill_tokens:
                    break
                width = wider
                taken.append(self._waiting.popleft())
        return taken

    def _drop_abandoned(self) -> None:
        """Forget waiting rows whose client went away (or whose group failed) before they got a slot."""
        if not any(row.done or row.request.cancelled for row in self._waiting):
            return
        keep: deque[_SlotRow] = deque()
        for row in self._waiting:
            if row.done or row.request.cancelled:
                if not row.done:
                    logger.info("Dropped a cancelled request from its batch after 0 tokens")
                self._row_done(row)
            else:
                keep.append(row)
        self._waiting = keep

    def _admit(self) -> None:
        arrivals = self._take_arrivals()
        if not arrivals:
            return
        first_slot = len(self._live)
        graphs, started = compiled_graphs(), time.monotonic()
        try:
            inputs = self._collate([r.request for r in arrivals], torch.device("cpu"))
            prefill = self.decoder.prefill(inputs, first_slot, self.device)
            self._period.prefilled(len(arrivals), inputs["input_ids"].numel(), time.monotonic() - started)
            if compiled_graphs() != graphs:  # every live sequence waited for it
                logger.warning("The prefill of %d prompts x %d tokens compiled new graphs (%.1fs): a shape the warm-up "
                               "did not cover", *inputs["input_ids"].shape, time.monotonic() - started)
        except Exception as error:  # a prompt the model refused: only its groups fail
            logger.exception("Prefill failed for %d requests", len(arrivals))
            for group in {row.group for row in arrivals}:
                self._fail_group(group, error)
            for row in arrivals:
                self._row_done(row)
            return
        for row in arrivals:
            row.cache_len = row.request.prompt_tokens
            self._live.append(row)
        self._pending.append(self._start_rows(arrivals, first_slot, prefill))

    def _start_rows(self, rows: list[_SlotRow], first_slot: int, prefill: Prefill) -> _Pending:
        """Fill the new slots' state and sample each prompt's first token (on the device)."""
        slots = torch.arange(first_slot, first_slot + len(rows), device=self.device)
        params = [r.request.sampling for r in rows]
        seeds = [p.seed if p.seed is not None else self._seeds.getrandbits(32) for p in params]
        length, rope_delta, min_tokens, ignore_eos, seed = self._to_device([
            [r.cache_len for r in rows], prefill.rope_deltas, [p.min_tokens for p in params],
            [int(p.ignore_eos) for p in params], [s & 0xFFFFFFFF for s in seeds],
        ], torch.long)
        temperature, top_p = self._to_device([[p.temperature for p in params], [p.top_p for p in params]],
                                             torch.float32)
        ignore_eos = ignore_eos.bool()
        state = self.state
        for target, values in ((state.length, length), (state.rope_delta, rope_delta), (state.min_tokens, min_tokens),
                               (state.seed, seed), (state.ignore_eos, ignore_eos), (state.temperature, temperature),
                               (state.top_p, top_p)):
            target.index_copy_(0, slots, values)
        zero = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        first = sample(prefill.logits, RowParams(temperature, top_p, seed, counter=zero,
                                                 suppress_eos=ignore_eos | (min_tokens > 0)),
                       self.decoder.eos_mask, any(not p.greedy for p in params))
        state.last_token.index_copy_(0, slots, first)
        state.generated.index_copy_(0, slots, zero + 1)
        state.active.index_fill_(0, slots, True)
        return self._to_host(list(rows), first)

    def _to_device(self, rows: list[list[float]], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(rows, dtype=dtype)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _to_host(self, rows: list[_SlotRow], tokens: torch.Tensor) -> _Pending:
        if self.device.type != "cuda":
            return _Pending(rows, tokens.clone())
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Pending(rows, host, ready)

    # ---- decoding ---------------------------------------------------------------------------------

    def _launch(self) -> _Pending | None:
        """Launch one decode step over every live slot; its tokens are read by a later `_process`."""
        live = len(self._live)
        if live == 0:
            return None
        rows = next(b for b in self.buckets if b >= live)
        needed = max(row.cache_len for row in self._live) + 1
        span = min(self.cache.max_len, max(self.options.min_length_bucket, 1 << (needed - 1).bit_length()))
        sampled = any(not row.request.sampling.greedy for row in self._live)
        self.runner.run((rows, span, sampled))
        self.decode_steps += 1
        self._period.launched()
        for row in self._live:
            row.cache_len += 1
        pending = self._to_host(list(self._live), self.state.next_token[:live])
        self._pending.append(pending)
        return pending

    def _process(self, pending: _Pending) -> None:
        """Stream one step's tokens: advance each live row, call each group's callback once."""
        tokens = pending.read()
        out: dict[_Group, list[GenerationChunk | None]] = {}
        ended: list[_SlotRow] = []
        for row, token in zip(pending.rows, tokens):
            if row.done:
                continue  # finished earlier: this was the extra step launched before we knew
            chunk = row.advance(token, self.eos_token_ids)
            self._period.tokens += 1
            if chunk is not None:
                out.setdefault(row.group, [None] * row.group.size)[row.index] = chunk
            if row.done:
                ended.append(row)
        for group, chunks in out.items():
            self._emit(group, chunks)
        for row in ended:
            self._row_done(row)

    def _emit(self, group: _Group, chunks: list[GenerationChunk | None]) -> None:
        if group.failed:
            return
        try:
            group.on_step(chunks)
        except Exception:  # a consumer's error must not stop the others' decoding
            logger.exception("A step callback failed")

    def _release_finished(self) -> None:
        """Free finished slots, keeping the live ones in slots 0..n-1."""
        for slot in reversed(range(len(self._live))):
            if self._live[slot].done:
                self._free(slot)

    def _free(self, slot: int) -> None:
        last = len(self._live) - 1
        if slot != last:
            mover = self._live[last]
            # The launched steps have written up to cache_len positions of the mover's slot.
            self.cache.move(last, slot, min(mover.cache_len, self.cache.max_len))
            self.state.move(last, slot)
            self._live[slot] = mover
        self._live.pop()
        self.state.clear(last)

    # ---- completion and failure ----------------------------------------------------------------

    def _row_done(self, row: _SlotRow) -> None:
        """Count a finished row off its group (once); the last one completes the group's future."""
        row.done = True
        if row.closed:
            return
        row.closed = True
        group = row.group
        group.open_rows -= 1
        if group.open_rows == 0 and not group.future.done():
            group.future.set_result(None)

    def _fail_group(self, group: _Group, error: BaseException) -> None:
        """Fail the group's future; its rows stop (live ones are freed at the end of the iteration)."""
        if not group.future.done():
            group.future.set_exception(error)
        group.failed = True
        for row in group.rows:
            row.done = True

    def _fail_all(self, error: BaseException) -> None:
        """After a failed step nothing on the device can be trusted: end every request in flight."""
        with self._wake:
            rows = [*self._live, *self._waiting]
            self._waiting.clear()
            jobs, self._jobs = list(self._jobs), deque()
        for row in rows:
            self._fail_group(row.group, error)
            row.done = True
        self._live.clear()
        self._pending.clear()
        for _, future in jobs:
            future.set_exception(error)
        try:
            self.state.active.zero_()
            self.state.length.zero_()
        except Exception:  # the device itself may be gone
            logger.exception("Could not reset the slot state")

    def _warmup(self) -> None:
        started = time.monotonic()
        self._warm_prefill()
        logger.info("Warmed the prefill up in %.1fs", time.monotonic() - started)
        spans, span = [], self.options.min_length_bucket
        while span <= min(self.options.warmup_max_len, self.cache.max_len):
            spans.append(span)
            span *= 2
        started = time.monotonic()
        self.runner.warmup(self.buckets, spans)
        logger.info("Captured %d decode graphs in %.1fs", self.runner.captured, time.monotonic() - started)

    def _warm_prefill(self) -> None:
        """Encode two small images, and prefill text prompts of pad tokens at batch 3 and 1 into free
        slots, before any request: the first real requests would otherwise wait for the compilation of
        the vision blocks and prompt layers and for the first kernel choices. Odd sizes: a dynamic-shape
        graph first traced on even ones can assume their alignment and be compiled again later."""
        self.decoder.warm_vision(self.device)
        for rows in sorted({min(3, self.slots), 1}, reverse=True):
            ids = torch.full((rows, 17), self.pad_token_id, dtype=torch.long)
            self.decoder.prefill({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0, self.device)
