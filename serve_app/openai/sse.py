"""Server-sent events in OpenAI's streaming format: `data: <chunk json>` lines, then `data: [DONE]`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel

from serve_app.errors import APIError, unwrap
from serve_app.openai.choices import PLAIN, ChoiceStream, OutputOptions, usage
from serve_app.openai.protocol import ChatCompletionChunk, ChunkChoice
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
    options: OutputOptions = PLAIN,
) -> AsyncIterator[str]:
    """The SSE body of a streamed chat completion, given its first chunk already received.

    Each of the `options.n` choices opens with its role, streams its content (and tool calls, logprobs)
    and ends with its finish_reason; the usage chunk, when asked, follows them all.
    `on_done` receives the tokens used (prompt + completions) when the stream ends, however it
    ends: finished, failed, or abandoned by a client that went away.
    """
    created = int(time.time())
    choices = [ChoiceStream(index, options) for index in range(options.n)]

    def chunk_event(choice: ChunkChoice) -> str:
        return event(ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice]))

    def lasts() -> list[GenerationChunk]:
        return [choice.last for choice in choices if choice.last is not None] or [first]

    try:
        for choice in choices:
            yield chunk_event(choice.opening())
        try:
            pending: GenerationChunk | None = first
            while pending is not None:
                for chunk_choice in choices[pending.choice].chunk_choices(pending):
                    yield chunk_event(chunk_choice)
                if all(choice.finished for choice in choices):
                    break
                pending = await anext(chunks, None)
        except Exception as exc:  # the stream is open: report in-band, as OpenAI does, and end cleanly
            error = unwrap(exc) or APIError("The model stage failed while generating.")
            yield f"data: {error.body().model_dump_json()}\n\n"
            yield DONE
            return
        if include_usage:
            yield event(ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[],
                                            usage=usage(lasts())))
        yield DONE
    finally:
        if on_done is not None:
            await on_done(usage(lasts()).total_tokens)
