"""Structured outputs, tools, logprobs and n (issue 26), as the official openai client uses them against a
real `serve run` of the demo model. The demo model knows nothing of JSON or tools: what it returns well
formed, constrained decoding made so.
"""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.support.images import MODEL, data_url, png_bytes

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": data_url(png_bytes((224, 224)))}},
    {"type": "text", "text": "What shape is this?"},
]}]


def function(name: str, **properties: dict) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": f"{name} of a place",
        "parameters": {"type": "object", "properties": properties, "required": list(properties)},
    }}


# Enumerated values keep each answer short, whatever the demo model would write in a free string.
WEATHER = function("get_weather", city={"type": "string", "enum": ["Paris", "Oslo"]})
TIME = function("get_time", zone={"type": "string", "enum": ["UTC", "CET"]})


class Shape(BaseModel):
    shape: Literal["circle", "square", "triangle", "rectangle"]
    count: Literal[1, 2, 3]


def test_parse_with_a_pydantic_model(client: OpenAI) -> None:
    completion = client.beta.chat.completions.parse(model=MODEL, messages=QUESTION, response_format=Shape,
                                                    max_tokens=64)
    assert isinstance(completion.choices[0].message.parsed, Shape)


def test_parse_with_a_pydantic_model_streamed(client: OpenAI) -> None:
    with client.beta.chat.completions.stream(model=MODEL, messages=QUESTION, response_format=Shape,
                                             max_tokens=64) as stream:
        completion = stream.get_final_completion()
    assert isinstance(completion.choices[0].message.parsed, Shape)


def test_json_object_mode_answers_an_object(client: OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=96,
                                           response_format={"type": "json_object"})
    content = reply.choices[0].message.content
    assert content.startswith("{")
    if reply.choices[0].finish_reason == "stop":  # else cut by max_tokens: a prefix of an object
        assert isinstance(json.loads(content), dict)


def test_a_tool_loop_call_result_answer(client: OpenAI) -> None:
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=160)
    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls
    assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    assert set(json.loads(call.function.arguments)) in ({"city"}, {"zone"})
    messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], max_tokens=16)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content


def test_tool_choice_forced_to_a_named_function(client: OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    # The demo tokenizer spells the markup out nearly character by character: a call is ~80 tokens.
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], tool_choice=named,
                                           max_tokens=160)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    with client.chat.completions.stream(model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], tool_choice=named,
                                        max_tokens=160) as stream:
        streamed = stream.get_final_completion()
    assert [c.function.name for c in streamed.choices[0].message.tool_calls] == ["get_time"]


def test_logprobs_with_top_logprobs(client: OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 5 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token is the one sampled
    streamed = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=5, stream=True)
    tokens = [e.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for e in chunk.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_n_choices_with_a_seed(client: OpenAI) -> None:
    def ask(n: int):
        return client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=1.5,
                                              n=n, seed=1234)

    reply = ask(3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    # The first choice is the seed's own stream: what the same request with n=1 answers.
    assert reply.choices[0].message.content == ask(1).choices[0].message.content
    assert [c.message.content for c in ask(3).choices] == [c.message.content for c in reply.choices]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 1000}, "n"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "broken", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}},
         "response_format"),
        # Longer than ingress.max_grammar_chars (64 KiB): refused before the model stage compiles it.
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "huge", "schema": {
            "type": "object", "properties": {f"field_{i:05d}": {"type": "string"} for i in range(3000)}}}}},
         "response_format.json_schema.schema"),
    ],
)
def test_bad_combinations_are_400s_naming_the_parameter(client: OpenAI, fields: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, **fields)
    assert info.value.body["param"].startswith(param)
