"""Constrained decoding in the generate() engine with the demo model: whatever the model would say, greedy
or sampled, the output parses and matches the schema, or is one well-formed GLM tool call."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import pytest

from engine.generate.engine import GenerateEngine
from engine.grammar.errors import GrammarError
from serve_app.stage_types import GrammarSpec
from tests.engine.generate.conftest import Stream, ask, run

# Bounded strings, numbers and lists: a model that never closes a string still finishes within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "label": {"type": "string", "maxLength": 12},
        "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "blue"]}, "maxItems": 3},
        "position": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1},
                                                      "filled": {"type": "boolean"}}, "required": ["filled"]},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
    },
    "required": ["shape", "count", "label", "colors", "position"],
}
WEATHER = {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]},
}
SHAPES = {"name": "count_shapes", "parameters": {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
                                                 "required": ["color"]}}
TOOLS = json.dumps([WEATHER, SHAPES])
SAMPLED = [{"temperature": 1.0, "seed": 1}, {"temperature": 1.3, "seed": 2, "top_p": 0.95},
           {"temperature": 0.8, "seed": 3, "top_k": 20, "repetition_penalty": 1.3}]


def glm_call(text: str) -> tuple[str, dict[str, str]]:
    """A GLM tool call's name and raw argument values, read as GLM tool parsers read one (keys and values stripped)."""
    found = re.fullmatch(r"<tool_call>([^\n]*)\n(.*)</tool_call>", text, re.DOTALL)
    assert found, text
    pairs = re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", found.group(2), re.DOTALL)
    return found.group(1), {key.strip(): value.strip() for key, value in pairs}


def test_json_schema_output_always_matches_the_schema(engine: GenerateEngine) -> None:
    spec = GrammarSpec("json_schema", schema=json.dumps(SCHEMA))
    question = "How many circles are there? Answer in JSON."
    streams = run(engine, [ask(question, grammar=spec, **params) for params in [{}, *SAMPLED]])
    for stream in streams:
        assert stream.last.finish_reason == "stop", stream.text
        jsonschema.validate(json.loads(stream.text), SCHEMA)
    assert len({s.text for s in streams}) > 1  # the sampled rows really sampled


def test_json_object_output_is_an_object(engine: GenerateEngine) -> None:
    spec = GrammarSpec("json_object")
    streams = run(engine, [ask("Describe the picture in JSON.", grammar=spec, **params) for params in [{}, *SAMPLED]])
    for stream in streams:
        assert stream.last.finish_reason == "stop"
        assert isinstance(json.loads(stream.text), dict)


def test_a_forced_tool_call_names_the_tool_with_its_required_arguments(engine: GenerateEngine) -> None:
    forced = GrammarSpec("tool_call", tools=TOOLS, tool_name="get_weather")
    streams = run(engine, [ask("What is the weather in Paris?", grammar=forced, max_tokens=300, **params)
                           for params in [{}, *SAMPLED]])
    for stream in streams:
        assert stream.last.finish_reason == "stop", stream.text
        name, arguments = glm_call(stream.text)
        assert name == "get_weather"
        assert list(arguments) == ["city", "days"]
        jsonschema.validate({"city": arguments["city"], "days": json.loads(arguments["days"])}, WEATHER["parameters"])


def test_without_a_named_tool_the_call_is_to_one_of_the_tools(engine: GenerateEngine) -> None:
    spec = GrammarSpec("tool_call", tools=TOOLS)
    for stream in run(engine, [ask("Count the red shapes.", grammar=spec, max_tokens=300, **params)
                               for params in [{}, *SAMPLED]]):
        name, arguments = glm_call(stream.text)
        assert name in {"get_weather", "count_shapes"}
        schema = (WEATHER if name == "get_weather" else SHAPES)["parameters"]
        jsonschema.validate({k: v if k in ("city", "color") else json.loads(v) for k, v in arguments.items()}, schema)


def test_unconstrained_rows_are_untouched_and_a_bad_schema_fails_its_row_alone(engine: GenerateEngine) -> None:
    plain = ask("How many circles?", max_tokens=20)
    alone = run(engine, [plain])[0]
    bad = GrammarSpec("json_schema", schema=json.dumps({"type": "integer", "minimum": 5, "maximum": 2}))
    # `prepare` compiles the grammar: the request's own 400, before it is admitted.
    with pytest.raises(GrammarError) as refused:
        engine.prepare(ask("y", grammar=bad))
    assert refused.value.param == "response_format"
    # A row that reaches the batch anyway (an engine process's child gets prepared requests) fails alone.
    doomed = engine.prepare(ask("y"))
    doomed = replace(doomed, sampling=replace(doomed.sampling, grammar=bad))
    streams = [Stream() for _ in range(3)]

    def on_step(entries) -> None:
        for stream, entry in zip(streams, entries):
            if isinstance(entry, BaseException):
                stream.error = entry
            elif entry is not None:
                stream.chunks.append(entry)
                stream.text += entry.text

    engine.generate_batch([engine.prepare(ask("x", grammar=GrammarSpec("json_object"))), engine.prepare(plain), doomed],
                          on_step)
    assert streams[1].text == alone.text and streams[1].last.finish_reason == alone.last.finish_reason
    assert isinstance(streams[2].error, GrammarError) and streams[2].error.param == "response_format"
    assert isinstance(json.loads(streams[0].text), dict)
