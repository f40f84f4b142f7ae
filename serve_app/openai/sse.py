"""Server-sent events in OpenAI's streaming format: `data: <chunk json>` lines, then `data: [DONE]`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel

from serve_app.errors import APIError, unwrap
from serve_app.openai.protocol import ChatCompletionChunk, ChoiceDelta, ChunkChoice, CompletionUsage
from serve_app.stage_types import GenerationChunk

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


async def chat_completion_events(
    chunks: AsyncIterator[GenerationChunk],
    first: GenerationChunk,
    completion_id: str,
    model: str,
    include_usage: bool,
    on_done: Callable[[int], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of a streamed chat completion, given its first chunk already received.

    `on_done` receives the tokens used (prompt + completion) when the stream ends, however it
    ends: finished, failed, or abandoned by a client that went away.
    """
    created = int(time.time())

    def chunk_event(delta: ChoiceDelta, finish_reason=None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return event(ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice]))

    last = first
    try:
        yield chunk_event(ChoiceDelta(role="assistant", content=""))
        try:
            pending: GenerationChunk | None = first
            while pending is not None:
                last = pending
                if pending.text:
                    yield chunk_event(ChoiceDelta(content=pending.text))
                if pending.finish_reason is not None:
                    yield chunk_event(ChoiceDelta(), pending.finish_reason)
                    break
                pending = await anext(chunks, None)
        except Exception as exc:  # the stream is open: report in-band, as OpenAI does, and end cleanly
            error = unwrap(exc) or APIError("The model stage failed while generating.")
            yield f"data: {error.body().model_dump_json()}\n\n"
            yield DONE
            return
        if include_usage:
            usage = CompletionUsage.of(last.prompt_tokens, last.completion_tokens, last.image_tokens)
            yield event(ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage))
        yield DONE
    finally:
        if on_done is not None:
            await on_done(last.prompt_tokens + last.completion_tokens)
