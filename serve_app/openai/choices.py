"""The choices of a chat completion, made from the model stage's chunks, whole or streamed.

The model stage sends each choice's chunks (GenerationChunk.choice) interleaved with the others': each
carries that choice's new text, its cumulative completion_tokens, the logprobs of its tokens since its
last chunk when asked, and, last, its finish_reason. The prompt (and its count) is shared by all choices.

Where a request has tools and tool_choice is not "none", each choice's text is read for tool-call markup
(serve_app/openai/tool_calls.py): the calls become `tool_calls` and the finish_reason "tool_calls".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from serve_app.errors import APIError
from serve_app.openai.protocol import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    FinishReason,
    Function,
    TopLogprob,
)
from serve_app.openai.tool_calls import Parameters, ParsedCall, ToolCallStream, parse_tool_calls
from serve_app.stage_types import GenerationChunk, TokenLogprob

# JSON has no -inf (a token the grammar forbids): such log-probabilities are reported as this, as vLLM does.
_LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class OutputOptions:
    """How chunks become choices: how many, with logprobs or not, and whether tool calls are read."""

    n: int = 1
    logprobs: bool = False
    tool_parameters: Parameters | None = None  # read tool-call markup, with these functions' parameters

    @classmethod
    def of(cls, request: ChatCompletionRequest) -> OutputOptions:
        reads_calls = bool(request.tools) and request.effective_tool_choice != "none"
        parameters = {tool.function.name: tool.function.parameters for tool in request.tools or []}
        return cls(n=request.n, logprobs=bool(request.logprobs), tool_parameters=parameters if reads_calls else None)


PLAIN = OutputOptions()  # one choice, no logprobs, no tool calls read


def usage(lasts: Sequence[GenerationChunk]) -> CompletionUsage:
    """The prompt once, and every choice's completion (from each choice's latest chunk)."""
    return CompletionUsage.of(
        lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts), lasts[0].image_tokens,
        lasts[0].cached_tokens,
    )


def _logprobs(entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                token=entry.token,
                logprob=max(entry.logprob, _LOGPROB_FLOOR),
                bytes=list(entry.bytes),
                top_logprobs=[
                    TopLogprob(token=top.token, logprob=max(top.logprob, _LOGPROB_FLOOR), bytes=list(top.bytes))
                    for top in entry.top
                ],
            )
            for entry in entries
        ]
    )


# ---- whole -----------------------------------------------------------------------------------------


async def collect_completion(
    stream: AsyncIterator[GenerationChunk],
    first: GenerationChunk,
    completion_id: str,
    model: str,
    options: OutputOptions,
) -> ChatCompletion:
    """The completion with its n choices, read from `stream` (after its `first` chunk) until each finished.

    Raises APIError when the stream ends before every choice has finished.
    """
    texts: list[list[str]] = [[] for _ in range(options.n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(options.n)]
    lasts: list[GenerationChunk | None] = [None] * options.n
    chunk = first
    while True:
        texts[chunk.choice].append(chunk.text)
        logprobs[chunk.choice].extend(chunk.logprobs or ())
        lasts[chunk.choice] = chunk
        if all(last is not None and last.finish_reason is not None for last in lasts):
            break
        try:
            chunk = await anext(stream)
        except StopAsyncIteration:
            raise APIError("The model stage ended the answer early.") from None
    finished = [last for last in lasts if last is not None]  # all of them, by now
    choices = [
        _choice(index, "".join(texts[index]), logprobs[index], last.finish_reason, options)
        for index, last in enumerate(finished)
    ]
    return ChatCompletion(id=completion_id, model=model, choices=choices, usage=usage(finished))


def _choice(
    index: int, text: str, logprobs: list[TokenLogprob], finish_reason: FinishReason | None, options: OutputOptions
) -> Choice:
    content: str | None = text
    calls: list[ChatCompletionMessageToolCall] | None = None
    if options.tool_parameters is not None:
        parsed = parse_tool_calls(text, options.tool_parameters)
        content = parsed.content
        if parsed.calls:
            calls = [ChatCompletionMessageToolCall(id=c.id, function=Function(name=c.name, arguments=c.arguments))
                     for c in parsed.calls]
            finish_reason = "tool_calls"
    return Choice(
        index=index,
        message=ChatCompletionMessage(content=content, tool_calls=calls),
        finish_reason=finish_reason,  # set: the choice has finished
        logprobs=_logprobs(logprobs) if options.logprobs else None,
    )


# ---- streamed --------------------------------------------------------------------------------------


class ChoiceStream:
    """One choice of a streamed completion: each of its chunks becomes the chunk choices to send."""

    def __init__(self, index: int, options: OutputOptions) -> None:
        self.index = index
        self._logprobs = options.logprobs
        self._calls = ToolCallStream(options.tool_parameters) if options.tool_parameters is not None else None
        self.last: GenerationChunk | None = None

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finish_reason is not None

    def opening(self) -> ChunkChoice:
        return ChunkChoice(index=self.index, delta=ChoiceDelta(role="assistant", content=""))

    def chunk_choices(self, chunk: GenerationChunk) -> list[ChunkChoice]:
        """What `chunk` adds to the choice (new content, completed calls, logprobs), then, on the choice's
        last chunk, its finish_reason in a chunk of its own, as OpenAI ends a choice."""
        self.last = chunk
        content, calls = self._calls.feed(chunk.text) if self._calls is not None else (chunk.text, [])
        if chunk.finish_reason is not None and self._calls is not None:
            content += self._calls.finish()
        logprobs = _logprobs(chunk.logprobs) if self._logprobs and chunk.logprobs else None
        out = []
        if content or calls or logprobs is not None:
            first_call = (self._calls.calls if self._calls is not None else 0) - len(calls)
            delta = ChoiceDelta(
                content=content if content or not calls else None,
                tool_calls=[_call_delta(first_call + i, call) for i, call in enumerate(calls)] or None,
            )
            out.append(ChunkChoice(index=self.index, delta=delta, logprobs=logprobs))
        if chunk.finish_reason is not None:
            made_calls = self._calls is not None and self._calls.calls > 0
            out.append(ChunkChoice(index=self.index, delta=ChoiceDelta(),
                                   finish_reason="tool_calls" if made_calls else chunk.finish_reason))
        return out


def _call_delta(index: int, call: ParsedCall) -> ChoiceDeltaToolCall:
    """A whole call in one delta: its id, name and arguments (OpenAI may spread the arguments over several)."""
    return ChoiceDeltaToolCall(
        index=index, id=call.id, type="function",
        function=ChoiceDeltaToolCallFunction(name=call.name, arguments=call.arguments),
    )
