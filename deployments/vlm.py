"""VLMServer: the vision encoder and language model, batching concurrent requests.

Concurrent `generate` calls are gathered by `@serve.batch`, and each gathered batch is handed to the
engine's running loop (`Engine.submit`, engine/protocol.py); `@serve.batch` returns at once, free to
gather the next arrivals. Every request gets its own stream back through
`handle.options(stream=True)`, fed step by step from the engine's callback. Which engine runs is the
model's settings' choice (`engine`, `engine_process`: engine/factory.py, engine/process/): the
replica drives them all the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ray import serve

from deployments.admission import AdmissionBudget, Cost
from deployments.metrics import VLMMetrics
from engine.protocol import Engine, StepOutput
from serve_app.settings import BatchSettings, ModelSettings
from serve_app.stage_types import GenerationChunk, GenerationRequest, ModelInfo, PreprocessedImage

if TYPE_CHECKING:
    from engine.prompts import PreparedRequest

logger = logging.getLogger("ray.serve")

_BATCH_DONE = object()


def coalesce(items: list) -> list:
    """`items` with each run of consecutive chunks of one choice merged into one (their text and
    logprobs joined; counts and finish_reason from the last, which are cumulative); anything else
    kept in its place."""
    out: list = []
    for item in items:
        last = out[-1] if out else None
        if (isinstance(item, GenerationChunk) and isinstance(last, GenerationChunk) and last.choice == item.choice
                and last.finish_reason is None):
            logprobs = None if item.logprobs is None else (*(last.logprobs or ()), *item.logprobs)
            out[-1] = replace(item, text=last.text + item.text, logprobs=logprobs)
        else:
            out.append(item)
    return out


@dataclass(eq=False)
class _Stream:
    """One request's chunks from the engine, all its choices', fed on the event loop; `ended` is set
    once the last chunk of every choice (or a failure) is in."""

    choices: int = 1
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _open: int = 0

    def __post_init__(self) -> None:
        self._open = self.choices

    def put(self, item) -> None:
        self.queue.put_nowait(item)
        if isinstance(item, GenerationChunk) and item.finish_reason is not None:
            self._open -= 1
        if not isinstance(item, GenerationChunk) or self._open == 0:
            self.ended.set()


@serve.deployment
class VLMServer:
    def __init__(self, model_settings: ModelSettings, batching: BatchSettings | None = None) -> None:
        # Imported here, not at the top: torch and transformers take seconds to import, and building the
        # application (`serve run`, `serve deploy`) imports this module without running a model.
        from engine.factory import load_engine
        from engine.process.engine_process import EngineProcess

        # The engine's loop in a process of its own, or in a thread of this one (ModelSettings.engine_process).
        self._engine: Engine = (
            EngineProcess(model_settings) if model_settings.engine_process else load_engine(model_settings)
        )
        # Health probes, off the event loop; one thread, so a probe that hangs never piles up others.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        self._metrics = VLMMetrics()
        self._in_flight = 0
        self._budget = AdmissionBudget(None, None)
        self.reconfigure((batching or BatchSettings()).model_dump())

    def reconfigure(self, user_config: dict) -> None:
        """Batching knobs arrive as `user_config`, so they change without restarting the replica."""
        settings = BatchSettings.model_validate(user_config)
        self._stall_timeout_s = settings.stall_timeout_s
        self._admission_timeout_s = settings.admission_timeout_s
        self._stream_interval_s = settings.stream_interval_s
        self._budget.resize(settings.token_budget, settings.max_images_in_flight)
        self._admit_batch.set_max_batch_size(settings.max_batch_size)
        self._admit_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        logger.info("Batching: max_batch_size=%d wait=%.3fs", settings.max_batch_size, settings.batch_wait_timeout_s)

    async def model_info(self) -> ModelInfo:
        s = self._engine.settings
        prompter = self._engine.prompter
        return ModelInfo(s.id, list(s.aliases), self._engine.quantization, s.max_model_len, str(self._engine.device),
                         self._budget.max_tokens, self._budget.max_images,
                         generation_defaults=prompter.sampling_defaults, max_prompt_chars=prompter.max_prompt_chars)

    async def generate(self, request: GenerationRequest, *images: PreprocessedImage) -> AsyncIterator[GenerationChunk]:
        """Stream one request's text; errors in the request surface before its first chunk.

        `images` (the request's, in order) come as arguments of their own: the ingress passes the
        preprocessor's responses here unresolved, and Serve resolves only top-level arguments.
        """
        if images:
            request = replace(request, images=[*request.images, *images])
        prepared = await asyncio.to_thread(self._engine.prepare, request)
        choices = prepared.choices(request.n)
        cost = Cost(tokens=prepared.prompt_tokens + request.n * prepared.max_tokens, images=len(request.images))
        await self._budget.acquire(cost, self._admission_timeout_s)
        open_choices = request.n
        self._in_flight += 1
        self._metrics.queue_depth.set(self._in_flight)
        try:
            async for chunk in self._stream(choices):
                yield chunk
                if chunk.finish_reason is not None:
                    open_choices -= 1
                    if open_choices == 0:
                        return
        finally:
            # Reached on completion, on an error and when the client goes away (cancellation or an
            # abandoned stream): the engine drops the rows at its next step either way.
            for choice in choices:
                self._engine.cancel(choice)
            await self._budget.release(cost)
            self._in_flight -= 1
            self._metrics.queue_depth.set(self._in_flight)
            self._metrics.export_cache_stats(self._engine.cache_stats())
            if open_choices:
                self._metrics.cancelled.inc()

    async def _stream(self, choices: list[PreparedRequest]) -> AsyncIterator[GenerationChunk]:
        """One request's chunks from the engine, every choice's; its error, if the engine fails it.

        Chunks that queued up while this stream waited for the event loop go out as one: each item
        streamed through Ray costs the replica's event loop (and the ingress and proxy after it) about
        the same whatever its length, and dozens of sequences at full decode speed make more items than
        one loop serialises without slowing the engine thread, with which it shares the GIL. Under light
        load nothing queues up and every token goes out as soon as it is decoded, unless
        `stream_interval_s` asks to gather tokens for that long after each chunk (never past the end).
        """
        stream = await self._admit_batch(choices)
        while True:
            items = [await stream.queue.get()]
            while not stream.queue.empty():
                items.append(stream.queue.get_nowait())
            for item in coalesce(items):
                if item is _BATCH_DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
            if self._stream_interval_s:
                with suppress(TimeoutError):
                    await asyncio.wait_for(stream.ended.wait(), self._stream_interval_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _admit_batch(self, batch: list[list[PreparedRequest]]) -> list[_Stream]:
        """Hands a gathered batch of requests (each as its choices, in order) to the engine's loop;
        returns each request's stream."""
        logger.info("Admitting a batch: batch_size=%d (live sequences: %d)", len(batch), self._engine.live)
        self._metrics.batch_size.observe(len(batch))
        loop = asyncio.get_running_loop()
        streams = [_Stream(len(choices)) for choices in batch]
        rows = [choice for choices in batch for choice in choices]
        owners = [stream for stream, choices in zip(streams, batch) for _ in choices]

        def deliver(entries: list[StepOutput]) -> None:
            for stream, row, entry in zip(owners, rows, entries):
                if isinstance(entry, GenerationChunk) and row.choice:
                    entry = replace(entry, choice=row.choice)
                if entry is not None:  # a chunk, or this request's own error
                    stream.put(entry)

        def close(done: Future) -> None:
            # After every chunk: the engine calls on_step before it completes the future, and
            # call_soon_threadsafe keeps that order.
            end = done.exception() or _BATCH_DONE
            for stream in streams:
                stream.put(end)

        future = self._engine.submit(rows, lambda entries: loop.call_soon_threadsafe(deliver, entries))
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(close, done))
        return streams

    async def check_health(self) -> None:
        """Healthy when a running batch keeps stepping, or when an idle model can run a forward pass.
        (Also brings the cache metrics up to date, from an engine process's latest beat too.)"""
        self._metrics.export_cache_stats(self._engine.cache_stats())
        if self._engine.busy:
            stalled = time.monotonic() - self._engine.last_step_at
            if stalled > self._stall_timeout_s:
                raise RuntimeError(f"the running batch made no step for {stalled:.0f}s")
            return
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self._executor, self._engine.probe), self._stall_timeout_s)
