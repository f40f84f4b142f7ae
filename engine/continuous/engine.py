"""ContinuousEngine: iteration-level batching over a paged KV cache, driven by one engine thread.

Up to `max_slots` sequences decode together over a paged KV cache; a request joins them at the
next iteration after it arrives and leaves the iteration it finishes. The engine's thread loops:
1. schedule: the scheduler (scheduler.py, no tensors) picks the prompt chunks to prefill within the
   budget, free slots and KV blocks, and the decode step over every live sequence;
2. run: the runner (runner.py, the tensors and model calls) prefills the chunks into their blocks
   and samples the first tokens of the prompts they complete, then launches the decode step (a CUDA
   graph replay on a GPU, when enabled);
3. postprocess: while that step runs on the device, the tokens of the previous step are read (the
   one host-device synchronisation per step) and advanced row by row (`RowState.advance`: the same
   stop / max_tokens / min_tokens / cancellation rules as the generate() engine), and each group's
   callback gets its entries; finished sequences free their slots.
Because step N+1 is launched before step N's tokens are read, a sequence that ends at step N
computes one extra token, which is dropped. While rows with a grammar decode, whose masks need step
N's tokens, step N+1 runs in two halves: its forward pass is launched, step N's tokens are read and
the grammars advanced meanwhile, then the masks go in and the second half samples.

With prefix caching (`prefix_caching`), the blocks of ended sequences stay cached until their
memory is needed, and a prompt that begins as an earlier one did prefills only the rest; vision
features stay in an encoder cache (`encoder_cache_bytes`). `cache_stats` counts both.

Requests arrive as groups (`submit`, one group per `@serve.batch` call); a group's future completes
when all its requests are done, or fails with the error that stopped them: a failed prefill fails
only its groups, a failed decode step every request in flight (nothing on the device can be
trusted after it), and the engine goes on with the next requests.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.continuous.blocks import BlockPool
from engine.continuous.prefix_cache import PrefixCaching
from engine.continuous.runner import ModelRunner, Pending
from engine.continuous.scheduler import Group, Scheduler, SlotRow
from engine.grammar.errors import GrammarError
from engine.in_process import InProcessEngine
from engine.loader import LoadedModel
from engine.prompts import PreparedRequest
from engine.protocol import StepCallback, deliver
from serve_app.stage_types import CacheStats

logger = logging.getLogger("ray.serve")


@dataclass
class BusyPeriod:
    """What the engine did from becoming busy to going idle, logged then: where a burst's time went
    (decode steps, prefill passes between them, the host's pace between launches)."""

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


class ContinuousEngine(InProcessEngine):
    """The engine interface over a scheduler and a model runner, on one engine thread."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        self.runner = ModelRunner(loaded)
        options = loaded.settings.continuous
        pool = BlockPool(self.runner.cache.num_blocks, self.runner.cache.block_size)
        model = loaded.model
        prefix = (PrefixCaching(model.config.image_token_id, model.model.visual.spatial_merge_size ** 2)
                  if options.prefix_caching else None)
        self.scheduler = Scheduler(self.runner.slots, self.runner.max_len, options.max_prefill_tokens,
                                   options.batch_buckets, options.min_length_bucket, pool, prefix)
        self.decode_steps = 0  # decode steps launched so far (read by tests and benchmarks)
        self._period: BusyPeriod | None = None
        # Steps whose tokens are not read yet: their rows, each row's incarnation then, the tokens.
        self._pending: deque[tuple[list[SlotRow], list[int], Pending]] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()  # guards the scheduler's queue, _jobs and _closed
        self._closed = False
        self._busy = False
        self._last_step_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="continuous-engine", daemon=True)
        self._thread.start()
        steps = self.runner.steps
        logger.info("Continuous engine: %d slots, %d-token sequences, KV cache %d blocks of %d (%.2f GiB), buckets %s, "
                    "cuda_graphs=%s, compile=%s", self.runner.slots, self.runner.max_len, pool.num_blocks,
                    pool.block_size, self.runner.cache.bytes() / 2**30, self.scheduler.buckets, steps.use_graphs,
                    steps.compiled)
        if steps.use_graphs:
            self.call(lambda: self.runner.warmup(self.scheduler.buckets))
        # What the load and warm-up made (the model's modules, the compiled code's objects) lives as long
        # as the process: frozen, the collector never walks it again, so an oldest-generation collection
        # on the engine thread stays short (vLLM's engine core does the same after its start).
        gc.collect()
        gc.freeze()

    # ---- requests -------------------------------------------------------------------------------

    def submit(self, batch: list[PreparedRequest], on_step: StepCallback) -> Future:
        for request in batch:
            self.scheduler.check(request)
        group = Group.of(batch, on_step, self.detokenizer_type, self.loaded.tokenizer)
        for row in group.rows:  # on the caller's thread: compiling a new grammar may take a while
            if row.request.sampling.grammar is not None:
                try:
                    row.grammar = self.grammars.matcher(row.request.sampling.grammar)
                except GrammarError as error:  # fails alone; the scheduler drops it as done
                    row.fail(error)
        errors = [row.take_error() for row in group.rows]
        if any(error is not None for error in errors):
            deliver(on_step, errors)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if not self._busy:  # the stall clock starts now, not at the last step before going idle
                self._last_step_at = time.monotonic()
            self.scheduler.add(group)
            self._busy = True
            self._wake.notify()
        return group.future

    def cancel(self, request: PreparedRequest) -> None:
        request.cancelled = True

    # ---- health -----------------------------------------------------------------------------------

    def probe(self) -> None:
        """One tiny forward pass, on the engine thread (so never concurrently with a step)."""
        self.call(self.runner.probe)

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def last_step_at(self) -> float:
        return self._last_step_at

    @property
    def live(self) -> int:
        return len(self.scheduler.live)

    def cache_stats(self) -> CacheStats:
        scheduler, encoder = self.scheduler, self.runner.encoder_cache
        return CacheStats(scheduler.prefix_queried_tokens, scheduler.prefix_hit_tokens, encoder.queries, encoder.hits,
                          encoder.bytes)

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
        """Stop the engine thread; requests still in flight fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._closed or self._jobs or self.scheduler.has_work or self._pending):
                        self._busy = False
                        self._wake.wait()
                    if self._closed:
                        break
                    jobs, self._jobs = list(self._jobs), deque()
                for fn, future in jobs:
                    _run_job(fn, future)
                try:
                    self._iterate()
                except Exception as error:  # a broken step: every request in flight fails with it
                    logger.exception("The continuous engine failed a step")
                    self._fail_all(error)
        self._fail_all(RuntimeError("the engine was closed"))

    def _iterate(self) -> None:
        """One iteration: schedule -> run (prefill, then launch a decode step) -> postprocess."""
        if self._period is None:
            self._period = BusyPeriod()
        self._prefill()
        launched = self._decode_constrained() if self.scheduler.constrained else self._decode()
        # Everything before the step just launched is read now, while that step runs.
        while len(self._pending) > (1 if launched else 0):
            self._postprocess(*self._pending.popleft())
        for move in self.scheduler.release_finished():
            self.runner.free(move)
        self._last_step_at = time.monotonic()
        with self._wake:
            self._busy = bool(self.scheduler.has_work or self._pending)
        if not self._busy:
            if self._period.steps:
                logger.info(self._period.summary())
            self._period = None

    def _prefill(self) -> None:
        with self._wake:
            batch = self.scheduler.schedule_prefill()
        if batch is None:
            return
        started = time.monotonic()
        try:
            pending, tokens = self.runner.prefill(batch)
        except Exception as error:  # a prompt the model refused: only its groups fail
            logger.exception("Prefill failed for %d requests", len(batch.rows))
            self.scheduler.reject(batch, error)
            return
        self._period.prefilled(len(batch.rows), tokens, time.monotonic() - started)
        self.scheduler.prefilled(batch)
        if pending is not None:
            rows = batch.completing
            self._pending.append((rows, [row.incarnation for row in rows], pending))

    def _decode(self) -> bool:
        batch = self.scheduler.schedule_decode()
        if batch is None:
            return False
        pending = self.runner.decode(batch)
        if pending is None:  # every row was preempted
            return False
        self.scheduler.launched(batch)
        self.decode_steps += 1
        self._period.launched()
        self._pending.append((batch.rows, batch.incarnations, pending))
        return True

    def _decode_constrained(self) -> bool:
        """The decode step while grammar rows are live: a grammar row's next mask needs its last token,
        so the step runs in two halves, and the host reads every step launched before (advancing the
        rows' grammars) while the device runs the forward pass; then the masks go in and it samples."""
        batch = self.scheduler.schedule_decode()
        if batch is None or not self.runner.forward(batch):
            return False
        while self._pending:
            self._postprocess(*self._pending.popleft())
        pending = self.runner.sample(batch)
        self.scheduler.launched(batch)
        self.decode_steps += 1
        self._period.launched()
        self._pending.append((batch.rows, batch.incarnations, pending))
        return True

    def _postprocess(self, rows: list[SlotRow], incarnations: list[int], pending: Pending) -> None:
        """Stream one step's tokens: each group's callback once, then the ended rows counted off
        (a group's future completes after its last callback)."""
        tokens = pending.read()
        entries = None
        if pending.logprobs is not None:
            top = [row.request.sampling.logprobs or 0 for row in rows]
            entries = self.token_texts.entries(pending.logprobs, tokens, top)
        result = self.scheduler.postprocess(rows, incarnations, tokens, self.loaded.eos_token_ids, entries)
        self._period.tokens += result.tokens
        for group, entries in result.outputs.items():
            deliver(group.on_step, entries)
        for row in result.ended:
            self.scheduler.finish(row)

    def _fail_all(self, error: BaseException) -> None:
        """After a failed step nothing on the device can be trusted: end every request in flight."""
        with self._wake:
            self.scheduler.fail_all(error)
            jobs, self._jobs = list(self._jobs), deque()
        self._pending.clear()
        for _, future in jobs:
            future.set_exception(error)
        self.runner.reset()


def _run_job(fn: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as error:  # noqa: BLE001 - handed to the caller
        future.set_exception(error)
