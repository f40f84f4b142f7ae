"""GrammarCompiler on the demo tokenizer: what each kind of spec allows, caching, and errors."""

from __future__ import annotations

import json

import pytest

from engine.grammar.compiler import GrammarCompiler
from engine.grammar.errors import GrammarError
from serve_app.stage_types import GrammarSpec
from tests.engine.grammar.conftest import accepts

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer", "minimum": 0}, "note": {"type": "string"}},
    "required": ["name", "count"],
}


def test_json_object_is_any_object_written_compactly(compiler: GrammarCompiler, tokenizer) -> None:
    spec = GrammarSpec("json_object")
    assert accepts(compiler, tokenizer, spec, '{"a": [1, {"b": null}], "c": "d"}')
    assert accepts(compiler, tokenizer, spec, "{}")
    for other in ('[1, 2]', '"text"', "3", '{"a": 1} trailing', '{ "a": 1}', '{"a":1}'):
        assert not accepts(compiler, tokenizer, spec, other), other


def test_json_schema_is_strict_and_in_declared_order(compiler: GrammarCompiler, tokenizer) -> None:
    spec = GrammarSpec("json_schema", schema=json.dumps(SCHEMA))
    assert accepts(compiler, tokenizer, spec, '{"name": "x", "count": 2}')
    assert accepts(compiler, tokenizer, spec, '{"name": "x", "count": 2, "note": "y"}')
    for other in ('{"count": 2, "name": "x"}', '{"name": "x"}', '{"name": "x", "count": -1}',
                  '{"name": "x", "count": 2, "extra": 1}'):
        assert not accepts(compiler, tokenizer, spec, other), other


def test_each_spec_compiles_once(compiler: GrammarCompiler) -> None:
    spec = GrammarSpec("json_schema", schema=json.dumps(SCHEMA))
    assert compiler.compile(spec) is compiler.compile(GrammarSpec("json_schema", schema=json.dumps(SCHEMA)))
    assert compiler.compile(GrammarSpec("json_object")) is not compiler.compile(spec)


@pytest.mark.parametrize(("schema", "reason"), [
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum greater than maximum"),
    ({"type": "string", "pattern": "(["}, "Regex parsing error"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "Cannot find field"),
    ({"type": "wrong"}, 'Unsupported type "wrong"'),
])
def test_a_schema_that_cannot_compile_is_a_grammar_error_saying_why(compiler: GrammarCompiler, schema: dict,
                                                                    reason: str) -> None:
    with pytest.raises(GrammarError) as raised:
        compiler.compile(GrammarSpec("json_schema", schema=json.dumps(schema)))
    message = str(raised.value)
    assert message.startswith("response_format.json_schema.schema cannot be compiled into a grammar: ")
    assert reason in message and ".cc:" not in message  # xgrammar's reason, without its C++ location
    assert raised.value.param == "response_format"


def test_an_unenforceable_tool_schema_is_a_grammar_error_on_tools(compiler: GrammarCompiler) -> None:
    tools = json.dumps([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}])
    with pytest.raises(GrammarError, match=r"tools\[0\].function.parameters uses `not` at #/properties/a") as raised:
        compiler.matcher(GrammarSpec("tool_call", tools=tools))
    assert raised.value.param == "tools"


def test_token_bytes_span_the_model_vocabulary(compiler: GrammarCompiler, tokenizer) -> None:
    assert len(compiler.token_bytes) == compiler.vocab_size > len(tokenizer)
    ids = tokenizer.encode(" café", add_special_tokens=False)
    assert b"".join(compiler.token_bytes[i] for i in ids) == " café".encode()
