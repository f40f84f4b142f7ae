"""What the model stage gets from a request with tools, tool results, response_format, logprobs and n."""

from __future__ import annotations

import json

import pytest

from serve_app.errors import InvalidRequestError
from serve_app.openai.conversation import (
    choices,
    estimate_tokens,
    grammar_param,
    sampling_params,
    split_request,
    template_tools,
    text_chars,
)
from serve_app.openai.protocol import ChatCompletionRequest
from serve_app.settings import IngressSettings
from serve_app.stage_types import GrammarSpec, PromptMessage, TextPart, ToolCall

LIMITS = IngressSettings()
WEATHER = {"name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"properties": {}, "type": "object"}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_calls_and_results_become_prompt_messages() -> None:
    body = request(messages=[
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
    ])
    messages, images = split_request(body, LIMITS)
    assert messages[1] == PromptMessage("assistant", (TextPart(""),), tool_calls=(
        ToolCall("call_1", "get_weather", '{"city": "Paris"}'), ToolCall("call_2", "get_time", "{}")))
    assert messages[2] == PromptMessage("tool", (TextPart("sunny"),), tool_call_id="call_1")
    assert messages[3] == PromptMessage("tool", (TextPart("noon"),), tool_call_id="call_2")
    assert messages[1].as_template_message()["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert images == []


def test_messages_without_tools_are_as_before() -> None:
    messages, _ = split_request(request(messages=[{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"}]), LIMITS)
    assert [m.as_template_message() for m in messages] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
    ]


def test_tools_are_rendered_unless_tool_choice_is_none() -> None:
    rendered = template_tools(request(tools=TOOLS))
    assert rendered == [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "strict"}},
                        {"type": "function", "function": TIME}]
    assert template_tools(request(tools=TOOLS, tool_choice="required")) == rendered
    assert template_tools(request(tools=TOOLS, tool_choice="none")) is None
    assert template_tools(request()) is None


def test_auto_and_none_leave_decoding_free() -> None:
    for fields in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}, {"tools": TOOLS, "tool_choice": "none"},
                   {"response_format": {"type": "text"}}, {}):
        assert sampling_params(request(**fields), LIMITS).grammar is None


def test_required_and_named_choices_are_enforced_by_a_tool_call_grammar() -> None:
    functions = json.dumps([{k: v for k, v in WEATHER.items() if k != "strict"}, TIME], sort_keys=True,
                           separators=(",", ":"))
    required = sampling_params(request(tools=TOOLS, tool_choice="required"), LIMITS).grammar
    assert required == GrammarSpec("tool_call", tools=functions)
    named = sampling_params(request(tools=TOOLS, tool_choice=NAMED), LIMITS).grammar
    assert named == GrammarSpec("tool_call", tools=functions, tool_name="get_time")
    # a forced call wins over response_format: the answer is the call
    both = request(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert sampling_params(both, LIMITS).grammar.kind == "tool_call"


def test_response_format_asks_for_json() -> None:
    assert sampling_params(request(response_format={"type": "json_object"}), LIMITS).grammar == GrammarSpec("json_object")
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    body = request(response_format={"type": "json_schema", "json_schema": {"name": "X", "schema": schema, "strict": True}})
    spec = sampling_params(body, LIMITS).grammar
    assert spec.kind == "json_schema" and json.loads(spec.schema) == schema
    # canonical: the same schema written another way is the same text
    shuffled = {"properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "type": "object"}
    other = request(response_format={"type": "json_schema", "json_schema": {"name": "Y", "schema": shuffled}})
    assert sampling_params(other, LIMITS).grammar == spec


def test_a_grammar_error_names_the_parameter_it_came_from() -> None:
    assert grammar_param(request()) is None
    assert grammar_param(request(response_format={"type": "json_object"})) == "response_format"
    assert grammar_param(request(response_format={"type": "json_schema", "json_schema": {"name": "X", "schema": {}}})) \
        == "response_format.json_schema.schema"
    assert grammar_param(request(tools=TOOLS, tool_choice=NAMED)) == "tools"


def test_logprobs_ask_for_top_alternatives() -> None:
    assert sampling_params(request(), LIMITS).logprobs is None
    assert sampling_params(request(logprobs=True), LIMITS).logprobs == 0
    assert sampling_params(request(logprobs=True, top_logprobs=5), LIMITS).logprobs == 5
    assert sampling_params(request(logprobs=False), LIMITS).logprobs is None


def test_n_up_to_the_servers_maximum() -> None:
    assert choices(request(), LIMITS) == 1
    assert choices(request(n=LIMITS.max_n), LIMITS) == LIMITS.max_n
    with pytest.raises(InvalidRequestError) as info:
        choices(request(n=3), IngressSettings(max_n=2))
    assert (info.value.status_code, info.value.param) == (400, "n")


def test_the_token_estimate_covers_every_choice() -> None:
    one, three = estimate_tokens(request(max_tokens=100), 256), estimate_tokens(request(max_tokens=100, n=3), 256)
    assert three - one == 200


def test_rendered_tools_and_calls_count_as_prompt_text() -> None:
    plain = text_chars(request())
    assert text_chars(request(tools=TOOLS)) > plain
    assert text_chars(request(tools=TOOLS, tool_choice="none")) == plain
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    with_call = request(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}])
    assert text_chars(with_call) == plain + len("get_time") + len('{"zone": "UTC"}')


def test_a_grammar_longer_than_the_limit_is_refused_before_the_model_stage() -> None:
    from serve_app.errors import InvalidRequestError
    from serve_app.openai.conversation import sampling_params
    from serve_app.openai.protocol import ChatCompletionRequest
    from serve_app.settings import IngressSettings

    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(200)}}
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}})
    assert sampling_params(request, IngressSettings()).grammar is not None
    with pytest.raises(InvalidRequestError) as refused:
        sampling_params(request, IngressSettings(max_grammar_chars=1000))
    assert refused.value.param == "response_format.json_schema.schema" and "1000" in str(refused.value)
