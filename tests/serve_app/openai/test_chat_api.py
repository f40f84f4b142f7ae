"""The chat-completions route of the shipped app, in process, for the parameters of structured outputs,
tools, logprobs and n: bad combinations are OpenAI-shaped 400s naming the parameter, and good ones reach
the service and come back in OpenAI's shapes.

The service behind the route is a stand-in for the Ingress deployment (which needs Ray): it answers from
canned model-stage chunks through the shipped assembly. The `openai` SDK's own helpers (parse, stream,
tool-call accumulation) read the answers. The real graph: tests/integration/test_openai_extras.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
from fastapi import Response
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from openai import AsyncOpenAI
from pydantic import BaseModel

from serve_app.openai.app import build_api
from serve_app.openai.auth import Authenticator, Principal
from serve_app.openai.choices import OutputOptions, collect_completion
from serve_app.openai.protocol import ChatCompletionRequest, Model, ModelList
from serve_app.openai.sse import chat_completion_events
from serve_app.settings import IngressSettings
from serve_app.stage_types import GenerationChunk, TokenLogprob, TopLogprob

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]
CALL = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"


def one_chunk_each(text: str) -> Callable[[ChatCompletionRequest], list[GenerationChunk]]:
    """The model stage's answer to a request: `text` for each of its choices, in one chunk."""
    return lambda body: [GenerationChunk(text, 7, 5, "stop", choice=i) for i in range(body.n)]


class CannedService:
    """Answers each request with the chunks `answer` makes for it, through the shipped assembly."""

    def __init__(self, answer: Callable[[ChatCompletionRequest], list[GenerationChunk]]) -> None:
        self.answer = answer
        self.bodies: list[ChatCompletionRequest] = []

    async def list_models(self) -> ModelList:
        return ModelList(data=[])

    async def get_model(self, model_id: str) -> Model:
        raise NotImplementedError

    async def health(self) -> dict:
        return {"status": "ok"}

    async def chat_completions(self, body: ChatCompletionRequest, principal: Principal, response: Response):
        self.bodies.append(body)
        chunks = self.answer(body)

        async def rest() -> AsyncIterator[GenerationChunk]:
            for c in chunks[1:]:
                yield c

        options = OutputOptions.of(body)
        if body.stream:
            return StreamingResponse(chat_completion_events(rest(), chunks[0], "chatcmpl-1", body.model, True,
                                                            options=options), media_type="text/event-stream")
        return await collect_completion(rest(), chunks[0], "chatcmpl-1", body.model, options)


def client(text: str = "Sunny.") -> tuple[TestClient, CannedService]:
    settings = IngressSettings()
    service = CannedService(one_chunk_each(text))
    return TestClient(build_api(settings, service, Authenticator.from_settings(settings))), service


def post(c: TestClient, **fields):
    return c.post("/v1/chat/completions", json={"model": "m", "messages": USER, **fields})


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"top_logprobs": 5}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"n": 0}, "n"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS + TOOLS}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "Paris"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"messages": [*USER, {"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id"),
    ],
)
def test_bad_combinations_are_400s_naming_the_parameter(fields: dict, param: str) -> None:
    c, service = client()
    response = post(c, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert not service.bodies


def test_the_parameters_reach_the_service() -> None:
    c, service = client()
    history = [*USER,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    response = post(c, messages=history, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False, n=2,
                    logprobs=True, top_logprobs=20, response_format={"type": "json_object"})
    assert response.status_code == 200, response.text
    body = service.bodies[0]
    assert (body.n, body.logprobs, body.top_logprobs, body.response_format.type) == (2, True, 20, "json_object")
    assert [m.role for m in body.messages] == ["user", "assistant", "tool"]
    assert len(response.json()["choices"]) == 2


def test_a_plain_answer_keeps_its_shape_on_the_wire() -> None:
    c, _ = client()
    choice = post(c).json()["choices"][0]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Sunny."},
                      "finish_reason": "stop", "logprobs": None}


def test_a_call_comes_back_as_message_tool_calls() -> None:
    c, _ = client(CALL)
    choice = post(c, tools=TOOLS).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_a_streamed_call_comes_back_as_delta_tool_calls() -> None:
    c, _ = client(CALL)
    with c.stream("POST", "/v1/chat/completions",
                  json={"model": "m", "messages": USER, "tools": TOOLS, "stream": True}) as response:
        text = response.read().decode()
    assert '"tool_calls":[{"index":0,' in text and '"finish_reason":"tool_calls"' in text


def test_the_openapi_document_still_builds() -> None:
    c, _ = client()
    schema = c.get("/openapi.json").json()
    assert {"tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "n"} <= set(
        schema["components"]["schemas"]["ChatCompletionRequest"]["properties"])


# ---- the openai SDK's helpers read the answers -----------------------------------------------------


class Shapes(BaseModel):
    shape: str
    count: int


def sdk(answer: Callable[[ChatCompletionRequest], list[GenerationChunk]]) -> tuple[AsyncOpenAI, CannedService]:
    settings = IngressSettings()
    service = CannedService(answer)
    app = build_api(settings, service, Authenticator.from_settings(settings))
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0), service


def test_sdk_parse_with_a_pydantic_model() -> None:
    client, service = sdk(one_chunk_each('{"shape": "circle", "count": 2}'))

    async def run():
        whole = await client.chat.completions.parse(model="m", messages=USER, response_format=Shapes)
        async with client.chat.completions.stream(model="m", messages=USER, response_format=Shapes) as stream:
            streamed = await stream.get_final_completion()
        return whole, streamed

    for completion in asyncio.run(run()):
        assert completion.choices[0].message.parsed == Shapes(shape="circle", count=2)
    sent = service.bodies[0].response_format
    assert sent.type == "json_schema" and sent.json_schema.strict and sent.json_schema.schema_["required"] == [
        "shape", "count"]


def test_sdk_tool_loop_call_result_answer() -> None:
    answers = iter([CALL, "It is sunny in Paris."])
    client, service = sdk(lambda body: [GenerationChunk(next(answers), 7, 5, "stop")])

    async def run():
        messages: list = list(USER)
        first = await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        call = first.choices[0].message.tool_calls[0]
        messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        final = await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        return first, final

    first, final = asyncio.run(run())
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert final.choices[0].message.content == "It is sunny in Paris." and final.choices[0].finish_reason == "stop"
    sent = service.bodies[1].messages
    assert (sent[1].tool_calls[0].id, sent[2].tool_call_id) == (call.id, call.id)


def test_sdk_streamed_tool_call_with_a_named_choice() -> None:
    client, service = sdk(lambda body: [GenerationChunk(CALL[:20], 7, 3), GenerationChunk(CALL[20:], 7, 9, "stop")])
    choice = {"type": "function", "function": {"name": "get_weather"}}

    async def run():
        async with client.chat.completions.stream(model="m", messages=USER, tools=TOOLS, tool_choice=choice) as s:
            return await s.get_final_completion()

    completion = asyncio.run(run())
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in completion.choices[0].message.tool_calls] == ["get_weather"]
    assert service.bodies[0].tool_choice.function.name == "get_weather"


def test_sdk_logprobs_and_n() -> None:
    def answer(body: ChatCompletionRequest) -> list[GenerationChunk]:
        top = tuple(TopLogprob(t, -0.5 * i, tuple(t.encode())) for i, t in enumerate(["Two", "Three", "One"]))
        entry = TokenLogprob("Two", 0.0, tuple(b"Two"), top[: body.top_logprobs])
        return [GenerationChunk("Two", 7, 1, "stop", choice=i, logprobs=(entry,)) for i in range(body.n)]

    client, _ = sdk(answer)
    completion = asyncio.run(client.chat.completions.create(
        model="m", messages=USER, logprobs=True, top_logprobs=2, n=3, seed=7))
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert [t.token for t in completion.choices[2].logprobs.content[0].top_logprobs] == ["Two", "Three"]
    assert completion.usage.completion_tokens == 3 and completion.usage.prompt_tokens == 7
