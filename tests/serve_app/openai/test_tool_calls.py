"""GLM's tool-call markup read from whole answers, and from the same answers streamed in every split."""

from __future__ import annotations

import json
import random
import re

import pytest

from serve_app.openai.tool_calls import ParsedOutput, ToolCallStream, parse_tool_calls

PARAMETERS = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": ["string", "null"]}},
    },
    "search": {"type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object"}}},
    "ping": None,
}

CALL = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n" \
       "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"


def calls(output: ParsedOutput) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in output.calls]


def test_a_call_after_text_becomes_content_and_a_call() -> None:
    output = parse_tool_calls("Let me look.\n" + CALL, PARAMETERS)
    assert output.content == "Let me look."
    assert calls(output) == [("get_weather", {"city": "Paris", "days": 3})]
    assert re.fullmatch(r"call_[0-9a-f]{24}", output.calls[0].id)


def test_an_answer_of_calls_only_has_no_content() -> None:
    output = parse_tool_calls(CALL + "\n<tool_call>ping\n</tool_call>\n", PARAMETERS)
    assert output.content is None
    assert calls(output) == [("get_weather", {"city": "Paris", "days": 3}), ("ping", {})]
    assert output.calls[0].id != output.calls[1].id


def test_an_answer_without_calls_is_all_content() -> None:
    for text in ("", "Sunny.", "a < b and <tool", "x\n\n"):
        assert parse_tool_calls(text, PARAMETERS) == ParsedOutput(text, [])


def test_values_are_json_unless_their_parameter_is_a_string() -> None:
    text = ("<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>42</arg_value>\n"
            "<arg_key>filters</arg_key>\n<arg_value>{\"year\": 2024}</arg_value>\n"
            "<arg_key>extra</arg_key>\n<arg_value>[1, 2]</arg_value>\n"
            "<arg_key>note</arg_key>\n<arg_value>not json</arg_value>\n</tool_call>")
    assert calls(parse_tool_calls(text, PARAMETERS)) == [
        ("search", {"query": "42", "filters": {"year": 2024}, "extra": [1, 2], "note": "not json"})
    ]
    nullable = "<tool_call>get_weather<arg_key>units</arg_key><arg_value>null</arg_value></tool_call>"
    assert calls(parse_tool_calls(nullable, PARAMETERS)) == [("get_weather", {"units": "null"})]


def test_an_unclosed_call_stays_content_as_written() -> None:
    text = "Hmm.\n<tool_call>get_weather\n<arg_key>city</arg_key>"
    assert parse_tool_calls(text, PARAMETERS) == ParsedOutput(text, [])


def test_unknown_functions_are_reported_as_the_model_called_them() -> None:
    text = "<tool_call>launch\n<arg_key>count</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
    assert calls(parse_tool_calls(text, PARAMETERS)) == [("launch", {"count": 3})]


ANSWERS = [
    "Let me look.\n" + CALL,
    CALL,
    CALL + "\n" + CALL + "\n",
    "Before " + CALL + " between <tool_call>ping\n</tool_call> after.",
    "plain text, no calls at all < <tool <tool_call",
    "trailing whitespace  \n",
    "Hmm.\n<tool_call>get_weather\n<arg_key>city</arg_key>",
    CALL + "   <tool_call>ping",
    "<<tool_call>ping\n</tool_call>>",
    "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>a </tool_call> in text</arg_value>\n</tool_call>",
    "一个 <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>",
]


def streamed(pieces: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    reader = ToolCallStream(PARAMETERS)
    content, made = [], []
    for piece in pieces:
        text, new = reader.feed(piece)
        content.append(text)
        made += [(call.name, json.loads(call.arguments)) for call in new]
    content.append(reader.finish())
    assert reader.calls == len(made)
    return "".join(content), made


def expected(text: str) -> tuple[str, list[tuple[str, dict]]]:
    whole = parse_tool_calls(text, PARAMETERS)
    return whole.content or "", calls(whole)


@pytest.mark.parametrize("text", ANSWERS)
def test_streamed_at_every_boundary_reads_as_the_whole(text: str) -> None:
    want = expected(text)
    assert streamed(list(text)) == want
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == want, cut


@pytest.mark.parametrize("text", ANSWERS)
def test_streamed_in_random_pieces_reads_as_the_whole(text: str) -> None:
    rng = random.Random(text)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert streamed(pieces) == expected(text)


def test_text_that_cannot_start_a_call_is_not_held_back() -> None:
    reader = ToolCallStream(PARAMETERS)
    assert reader.feed("Sunny and warm") == ("Sunny and warm", [])
    assert reader.feed(" today <to") == (" today", [])  # the space may precede a call; "<to" may start one
    assert reader.feed("p>") == (" <top>", [])
    text, made = reader.feed("\n" + CALL)
    assert text == "" and [call.name for call in made] == ["get_weather"]
    assert reader.finish() == ""
