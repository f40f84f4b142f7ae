"""Choices made from the model stage's chunks: n choices, logprobs, tool calls, whole and streamed.

The chunks are what the model stage sends (GenerationChunk, interleaved by choice); the responses are
read back with the `openai` package's own types and its stream accumulator, as a client reads them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk

from serve_app.errors import APIError
from serve_app.openai.choices import OutputOptions, collect_completion
from serve_app.openai.protocol import ChatCompletionRequest
from serve_app.openai.sse import DONE, chat_completion_events
from serve_app.stage_types import GenerationChunk, TokenLogprob, TopLogprob

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}]
CALL = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def lp(token: str, logprob: float, *top: tuple[str, float]) -> TokenLogprob:
    return TokenLogprob(token, logprob, tuple(token.encode()),
                        tuple(TopLogprob(t, p, tuple(t.encode())) for t, p in top))


def chunk(text: str, done: int, finish=None, choice: int = 0, logprobs=None) -> GenerationChunk:
    return GenerationChunk(text, prompt_tokens=10, completion_tokens=done, finish_reason=finish,
                           image_tokens=4, choice=choice, logprobs=logprobs)


async def _iterate(chunks: list[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    for c in chunks:
        yield c


def whole(chunks: list[GenerationChunk], options: OutputOptions) -> dict:
    stream = _iterate(chunks[1:])
    completion = asyncio.run(collect_completion(stream, chunks[0], "chatcmpl-1", "m", options))
    body = json.loads(completion.model_dump_json())
    SDKChatCompletion.model_validate(body)  # the SDK's own type reads it
    return body


def streamed(chunks: list[GenerationChunk], options: OutputOptions, include_usage: bool = True) -> list[dict]:
    async def run() -> list[str]:
        return [e async for e in chat_completion_events(_iterate(chunks[1:]), chunks[0], "chatcmpl-1", "m",
                                                        include_usage, options=options)]

    events = asyncio.run(run())
    assert events[-1] == DONE
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def accumulated(events: list[dict], **state) -> SDKChatCompletion:
    """The completion the openai SDK's stream helper builds from the chunks."""
    accumulator = ChatCompletionStreamState(**state)
    for event in events:
        accumulator.handle_chunk(SDKChatCompletionChunk.model_validate(event))
    return accumulator.current_completion_snapshot


# ---- one choice, no extras: as before -----------------------------------------------------------------


def test_a_plain_answer_has_todays_shape() -> None:
    body = whole([chunk("A red ", 2), chunk("circle.", 3, "stop")], OutputOptions())
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "A red circle."},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                             "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 4}}


def test_a_plain_stream_has_todays_chunks() -> None:
    events = streamed([chunk("A red ", 2), chunk("circle.", 3, "stop")], OutputOptions())
    assert [e["choices"] for e in events] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        [{"index": 0, "delta": {"content": "A red "}}],
        [{"index": 0, "delta": {"content": "circle."}}],
        [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        [],
    ]
    assert events[-1]["usage"]["total_tokens"] == 13


# ---- n ------------------------------------------------------------------------------------------------

INTERLEAVED = [
    chunk("A ", 1, choice=1), chunk("Two", 1, choice=0), chunk("circle", 2, choice=1),
    chunk(" circles.", 3, "stop", choice=0), chunk("", 2, "length", choice=1),
]


def test_n_choices_are_grouped_by_their_index_and_counted_once_for_the_prompt() -> None:
    body = whole(INTERLEAVED, OutputOptions(n=2))
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Two circles.", "stop"), (1, "A circle", "length")]
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"], body["usage"]["total_tokens"]) == (
        10, 5, 15)


def test_n_choices_stream_each_under_its_index_then_the_usage() -> None:
    events = streamed(INTERLEAVED, OutputOptions(n=2))
    assert [e["choices"][0]["index"] for e in events[:2]] == [0, 1]  # each choice opens with its role
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    snapshot = accumulated(events)
    assert [(c.index, c.message.content, c.finish_reason) for c in snapshot.choices] == [
        (0, "Two circles.", "stop"), (1, "A circle", "length")]


def test_a_stream_that_ends_before_every_choice_finished_is_an_error() -> None:
    with pytest.raises(APIError, match="ended the answer early"):
        whole(INTERLEAVED[:-1], OutputOptions(n=2))


def test_the_stream_reports_every_choices_tokens_when_it_ends() -> None:
    spent: list[int] = []

    async def on_done(tokens: int) -> None:
        spent.append(tokens)

    async def run() -> None:
        async for _ in chat_completion_events(_iterate(INTERLEAVED[1:]), INTERLEAVED[0], "c", "m", False,
                                              on_done=on_done, options=OutputOptions(n=2)):
            pass

    asyncio.run(run())
    assert spent == [15]


# ---- logprobs -----------------------------------------------------------------------------------------

WITH_LOGPROBS = [
    chunk("Two", 1, logprobs=(lp("Two", -0.1, ("Two", -0.1), ("Three", -2.5)),)),
    chunk(" circles", 2, "stop", logprobs=(lp(" circles", float("-inf")),)),
]


def test_logprobs_of_each_token_with_its_top_alternatives() -> None:
    body = whole(WITH_LOGPROBS, OutputOptions(logprobs=True))
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "Two", "logprob": -0.1, "bytes": list(b"Two"), "top_logprobs": [
        {"token": "Two", "logprob": -0.1, "bytes": list(b"Two")},
        {"token": "Three", "logprob": -2.5, "bytes": list(b"Three")}]}
    assert content[1]["logprob"] == -9999.0  # JSON has no -inf
    assert whole(WITH_LOGPROBS, OutputOptions())["choices"][0]["logprobs"] is None


def test_streamed_logprobs_ride_with_their_tokens() -> None:
    events = streamed(WITH_LOGPROBS, OutputOptions(logprobs=True))
    tokens = [[t["token"] for t in e["choices"][0]["logprobs"]["content"]]
              for e in events if e["choices"] and "logprobs" in e["choices"][0]]
    assert tokens == [["Two"], [" circles"]]
    assert accumulated(events).choices[0].logprobs.content[0].top_logprobs[1].token == "Three"


# ---- tool calls ---------------------------------------------------------------------------------------

CALLING = [chunk("Checking.\n<tool", 3), chunk("_call>get_weather\n<arg_key>city</arg_key>\n", 9),
           chunk("<arg_value>Paris</arg_value>\n</tool_call>", 14, "stop")]


def test_tool_calls_are_read_when_the_request_has_tools() -> None:
    options = OutputOptions.of(request(tools=TOOLS))
    body = whole(CALLING, options)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_tool_calls_stream_as_openai_deltas() -> None:
    events = streamed(CALLING, OutputOptions.of(request(tools=TOOLS)))
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    [call_delta] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert call_delta[0]["index"] == 0 and call_delta[0]["type"] == "function"
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    snapshot = accumulated(events, input_tools=TOOLS)
    message = snapshot.choices[0].message
    assert message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]


def test_markup_is_content_with_tool_choice_none_or_without_tools() -> None:
    text = "".join(c.text for c in CALLING)
    for options in (OutputOptions.of(request(tools=TOOLS, tool_choice="none")), OutputOptions.of(request())):
        choice = whole(CALLING, options)["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (text, "stop")
        assert "tool_calls" not in choice["message"]


def test_a_forced_call_is_read_too() -> None:
    options = OutputOptions.of(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    body = whole([chunk(CALL, 12, "stop")], options)
    assert body["choices"][0]["message"]["content"] is None
    assert body["choices"][0]["finish_reason"] == "tool_calls"
