"""What a GrammarSpec may ask for: malformed specs and schema features the grammar would not enforce
are refused with a GrammarError naming them, without xgrammar or torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.grammar import specs
from engine.grammar.errors import GrammarError
from serve_app.errors import InvalidRequestError
from serve_app.stage_types import GrammarSpec

OBJECT = {"type": "object", "properties": {"a": {"type": "integer"}}}

# Each schema uses a feature xgrammar 0.2.9 accepts without enforcing, with a JSON text the grammar
# accepts although it does not match the schema (test_the_refused_features_are_really_ignored).
IGNORED = [
    ({"not": {"type": "string"}}, '"a"', "`not` at #"),
    ({"if": {"type": "string"}, "then": {"minLength": 3}}, '"a"', "`if` at #"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentRequired": {"a": ["b"]}}, '{"a": 1}', "`dependentRequired` at #"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a": 1}', "`dependentSchemas` at #"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependencies": {"a": ["b"]}}, '{"a": 1}',
     "`dependencies` at #"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]", "`uniqueItems` at #"),
    ({"type": "string", "format": "idn-email"}, '"x"', '`"format": "idn-email"` at #'),
    ({"type": "string", "pattern": "^a+$", "minLength": 3}, '"a"', "`minLength`/`maxLength` together with"),
    ({"type": "string", "format": "uri", "maxLength": 5}, '"http://example.com/long"', "`minLength`/`maxLength`"),
    ({"allOf": [{"type": "integer", "minimum": 3}, {"maximum": 5}]}, "9", "`allOf` with more than one schema at #"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/x", "maximum": 2}}, "$defs": {"x": {"type": "integer"}}},
     '{"a": 9}', "`maximum` beside `$ref` at #/properties/a"),
]


@pytest.mark.parametrize(("schema", "violating", "named"), IGNORED)
def test_features_the_grammar_would_ignore_are_refused_by_name(schema: dict, violating: str, named: str) -> None:
    spec = GrammarSpec("json_schema", schema=json.dumps(schema))
    with pytest.raises(GrammarError, match="constrained decoding cannot enforce") as raised:
        specs.check(spec)
    assert named in str(raised.value)
    assert raised.value.param == "response_format"


@pytest.mark.parametrize(("schema", "violating", "named"), IGNORED)
def test_the_refused_features_are_really_ignored(schema: dict, violating: str, named: str) -> None:
    """The lists in specs.py track the installed xgrammar: were a feature enforced, refusing it would be wrong."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    assert _is_grammar_accept_string(grammar, violating)


def test_nested_features_are_found_where_they_are() -> None:
    schema = {
        "type": "object",
        "properties": {"list": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"not": {}}]}}},
        "$defs": {"a/b": {"type": "integer"}},
    }
    assert specs.unsupported_feature(schema) == "`not` at #/properties/list/items/anyOf/1"
    assert specs.unsupported_feature({"$defs": {"a/b": {"if": {}}}}) == "`if` at #/$defs/a~1b"
    # A property that is merely named like a keyword is no keyword.
    assert specs.unsupported_feature({"type": "object", "properties": {"not": {"type": "string"}}}) is None


def test_what_pydantic_writes_passes() -> None:
    schema = {
        "$defs": {"Item": {"properties": {"name": {"title": "Name", "type": "string"}}, "required": ["name"],
                           "title": "Item", "type": "object"}},
        "properties": {
            "items": {"items": {"$ref": "#/$defs/Item"}, "title": "Items", "type": "array"},
            "best": {"$ref": "#/$defs/Item", "description": "The best one"},
            "when": {"anyOf": [{"format": "date-time", "type": "string"}, {"type": "null"}], "default": None},
            "count": {"maximum": 9, "minimum": 0, "type": "integer"},
        },
        "required": ["items", "best"],
        "title": "Answer",
        "type": "object",
    }
    specs.check(GrammarSpec("json_schema", schema=json.dumps(schema)))


@pytest.mark.parametrize(("spec", "param", "message"), [
    (GrammarSpec("json_schema", schema="{not json"), "response_format", "is not valid JSON"),
    (GrammarSpec("json_schema"), "response_format", "is missing"),
    (GrammarSpec("json_schema", schema="[1, 2]"), "response_format", "must be a JSON schema"),
    (GrammarSpec("tool_call", tools="[]"), "tools", "non-empty list"),
    (GrammarSpec("tool_call", tools='[{"parameters": {}}]'), "tools", "tools[0].function.name"),
    (GrammarSpec("tool_call", tools=json.dumps([{"name": "f", "parameters": {"type": "array"}}])), "tools",
     "tools[0].function.parameters must be a JSON schema of an object"),
    (GrammarSpec("tool_call", tools=json.dumps([{"name": "f", "parameters": OBJECT},
                                                 {"name": "g", "parameters": {"not": {}}}])), "tools",
     "tools[1].function.parameters uses `not` at #"),
    (GrammarSpec("tool_call", tools=json.dumps([{"name": "f"}]), tool_name="g"), "tool_choice",
     "names the function 'g', which is not in tools"),
])
def test_malformed_specs_name_their_parameter(spec: GrammarSpec, param: str, message: str) -> None:
    with pytest.raises(GrammarError) as raised:
        specs.check(spec)
    assert message in str(raised.value)
    assert raised.value.param == param
    assert isinstance(raised.value, InvalidRequestError) and isinstance(raised.value, ValueError)
    assert raised.value.status_code == 400


def test_tools_are_the_named_one_or_all_and_a_tool_without_parameters_takes_none() -> None:
    listed = json.dumps([{"name": "f", "parameters": OBJECT}, {"name": "g"}])
    assert specs.tools(GrammarSpec("tool_call", tools=listed)) == [specs.Tool("f", OBJECT), specs.Tool("g", specs.NO_PARAMETERS)]
    # With a named tool only its parameters count: another tool's unenforceable schema is no error.
    with_bad = json.dumps([{"name": "f", "parameters": OBJECT}, {"name": "h", "parameters": {"not": {}}}])
    assert specs.tools(GrammarSpec("tool_call", tools=with_bad, tool_name="f")) == [specs.Tool("f", OBJECT)]


def test_checking_a_spec_loads_neither_torch_nor_xgrammar() -> None:
    code = ("import sys; from engine.grammar import specs; from engine.grammar.errors import GrammarError; "
            "print(sorted(m for m in ('torch', 'xgrammar', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
