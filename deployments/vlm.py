"""VLMServer: the vision encoder and language model, batching concurrent requests.

Concurrent `generate` calls are gathered by `@serve.batch`; every request gets its own stream back
through `handle.options(stream=True)`, fed step by step. What a gathered batch becomes depends on
the engine (`ModelSettings.engine`):
- the continuous engine (engine/continuous): the batch is handed to the engine's running loop,
  where its requests join the sequences already decoding at the next step, and `@serve.batch`
  returns at once, free to gather the next arrivals;
- the generate() engine: the batch runs through one `generate()` call on a one-thread executor, and
  the next batch is gathered while it runs.
With `engine_process: true` in the model's YAML the engine runs in a child process
(engine/process/engine_process.py) and this replica only prepares requests and streams their chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, replace

from ray import serve

from deployments.admission import AdmissionBudget, Cost
from deployments.metrics import VLMMetrics
from engine.continuous import load_engine
from engine.generate.engine import PreparedRequest
from engine.process.engine_process import EngineProcess
from serve_app.settings import BatchSettings, ModelSettings
from serve_app.stage_types import GenerationChunk, GenerationRequest, ModelInfo, PreprocessedImage

logger = logging.getLogger("ray.serve")

_BATCH_DONE = object()


def coalesce(items: list) -> list:
    """`items` with each run of consecutive chunks merged into one (their text joined; counts and
    finish_reason from the last, which are cumulative); anything else kept in its place."""
    out: list = []
    for item in items:
        if isinstance(item, GenerationChunk) and out and isinstance(out[-1], GenerationChunk):
            out[-1] = replace(item, text=out[-1].text + item.text)
        else:
            out.append(item)
    return out


@dataclass(eq=False)
class _Stream:
    """One request's chunks from the continuous engine, fed on the event loop; `ended` is set once
    its last chunk (or its failure) is in."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item) -> None:
        self.queue.put_nowait(item)
        if not isinstance(item, GenerationChunk) or item.finish_reason is not None:
            self.ended.set()


@serve.deployment
class VLMServer:
    def __init__(self, model_settings: ModelSettings, batching: BatchSettings | None = None) -> None:
        # The engine's loop in a process of its own, or in a thread of this one (ModelSettings.engine_process).
        self._engine = EngineProcess(model_settings) if model_settings.engine_process else load_engine(model_settings)
        # One thread: generate() runs one batch at a time, off the event loop that feeds the streams
        # (the continuous engine has its own thread; this one then only runs health probes).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
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
        for gather in (self._generate_batch, self._admit_batch):
            gather.set_max_batch_size(settings.max_batch_size)
            gather.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        logger.info("Batching: max_batch_size=%d wait=%.3fs", settings.max_batch_size, settings.batch_wait_timeout_s)

    async def model_info(self) -> ModelInfo:
        s = self._engine.settings
        return ModelInfo(s.id, list(s.aliases), self._engine.quantization, s.max_model_len, str(self._engine.device),
                         self._budget.max_tokens, self._budget.max_images)

    async def generate(self, request: GenerationRequest, *images: PreprocessedImage) -> AsyncIterator[GenerationChunk]:
        """Stream one request's text; errors in the request surface before its first chunk.

        `images` (the request's, in order) come as arguments of their own: the ingress passes the
        preprocessor's responses here unresolved, and Serve resolves only top-level arguments.
        """
        if images:
            request = replace(request, images=[*request.images, *images])
        prepared = await asyncio.to_thread(self._engine.prepare, request)
        cost = Cost(tokens=prepared.prompt_tokens + prepared.max_tokens, images=len(request.images))
        await self._budget.acquire(cost, self._admission_timeout_s)
        finished = False
        self._in_flight += 1
        self._metrics.queue_depth.set(self._in_flight)
        try:
            chunks = self._stream_continuous(prepared) if self._engine.continuous else self._generate_batch(prepared)
            async for chunk in chunks:
                if chunk is None:
                    continue
                yield chunk
                if chunk.finish_reason is not None:
                    finished = True
                    return
        finally:
            # Reached on completion, on an error and when the client goes away (cancellation or an
            # abandoned stream): the engine drops the row at its next step either way.
            self._engine.cancel(prepared)
            await self._budget.release(cost)
            self._in_flight -= 1
            self._metrics.queue_depth.set(self._in_flight)
            if not finished:
                self._metrics.cancelled.inc()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, batch: list[PreparedRequest]):
        """Yields, per engine step, one entry per request: a chunk, None (nothing new) or StopIteration."""
        logger.info("Running a batch: batch_size=%d", len(batch))
        self._metrics.batch_size.observe(len(batch))
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()

        def on_step(chunks: list[GenerationChunk | None]) -> None:
            loop.call_soon_threadsafe(steps.put_nowait, chunks)

        run = loop.run_in_executor(self._executor, self._engine.generate_batch, batch, on_step)
        run.add_done_callback(lambda _: steps.put_nowait(_BATCH_DONE))
        finished = [False] * len(batch)
        while (step := await steps.get()) is not _BATCH_DONE:
            out: list = []
            for i, chunk in enumerate(step):
                if finished[i]:
                    out.append(StopIteration)
                else:
                    out.append(chunk)
                    finished[i] = chunk is not None and chunk.finish_reason is not None
            yield out
        await run  # re-raises an engine failure to every request of the batch

    async def _stream_continuous(self, prepared: PreparedRequest) -> AsyncIterator[GenerationChunk]:
        """One request's chunks from the continuous engine; its error, if the engine fails it.

        Chunks that queued up while this stream waited for the event loop go out as one: each item
        streamed through Ray costs the replica's event loop (and the ingress and proxy after it) about
        the same whatever its length, and 32 sequences at 110 tokens/s each is more items than one
        loop serialises without slowing the engine thread, with which it shares the GIL. Under light
        load nothing queues up and every token goes out as soon as it is decoded, unless
        `stream_interval_s` asks to gather tokens for that long after each chunk (never past the end).
        """
        stream = await self._admit_batch(prepared)
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
    async def _admit_batch(self, batch: list[PreparedRequest]) -> list[_Stream]:
        """Hands a gathered batch to the continuous engine's loop; returns each request's stream."""
        logger.info("Admitting a batch: batch_size=%d (live sequences: %d)", len(batch), self._engine.live)
        self._metrics.batch_size.observe(len(batch))
        loop = asyncio.get_running_loop()
        streams = [_Stream() for _ in batch]

        def deliver(chunks: list[GenerationChunk | None]) -> None:
            for stream, chunk in zip(streams, chunks):
                if chunk is not None:
                    stream.put(chunk)

        def close(done: Future) -> None:
            # After every chunk: the engine calls on_step before it completes the future, and
            # call_soon_threadsafe keeps that order.
            end = done.exception() or _BATCH_DONE
            for stream in streams:
                stream.put(end)

        future = self._engine.submit(batch, lambda chunks: loop.call_soon_threadsafe(deliver, chunks))
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(close, done))
        return streams

    async def check_health(self) -> None:
        """Healthy when a running batch keeps stepping, or when an idle model can run a forward pass."""
        if self._engine.busy:
            stalled = time.monotonic() - self._engine.last_step_at
            if stalled > self._stall_timeout_s:
                raise RuntimeError(f"the running batch made no step for {stalled:.0f}s")
            return
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self._executor, self._engine.probe), self._stall_timeout_s)
