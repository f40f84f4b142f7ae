"""A `GrammarSpec` read and checked in plain Python, before any grammar is compiled.

xgrammar compiles most of JSON Schema, but accepts a few keywords without enforcing them: a schema
using one would yield output that parses yet may not match it. Such schemas are refused here with a
`GrammarError` naming the keyword and where it is, rather than silently half-enforced. The lists
below are what xgrammar 0.2.9 ignores (each case is checked in tests/engine/grammar/test_specs.py).

No torch and no xgrammar: the ingress may call `check` to answer a bad schema with a 400 before the
request reaches a model replica; the compiler calls it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.grammar.errors import GrammarError
from serve_app.stage_types import GrammarSpec

# Keywords xgrammar accepts and ignores.
IGNORED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                    "uniqueItems")
# String formats xgrammar enforces; any other is ignored.
STRING_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})
# Keywords that may stand beside `$ref` (annotations); xgrammar drops any other sibling of a `$ref`.
REF_SIBLINGS = frozenset({"$ref", "$defs", "definitions", "$schema", "$id", "$comment", "title", "description",
                          "default", "examples", "deprecated", "readOnly", "writeOnly"})
# Where subschemas sit: one schema, a list of schemas, or a map of names to schemas.
_ONE = ("additionalProperties", "items", "contains", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
        "additionalItems")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions")

# A tool without `parameters` takes none (as OpenAI reads it).
NO_PARAMETERS: dict = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict  # a JSON schema of an object


def param_of(spec: GrammarSpec) -> str:
    """The request parameter a spec came from, as errors name it."""
    return "tools" if spec.kind == "tool_call" else "response_format"


def unsupported_feature(schema: Any, path: str = "#") -> str | None:
    """The first feature of `schema` that the grammar would not enforce, and where (a JSON pointer),
    e.g. "`not` at #/properties/a"; None when there is none."""
    if not isinstance(schema, dict):
        return None
    for key in IGNORED_KEYWORDS:
        if key in schema:
            return f"`{key}` at {path}"
    types = schema.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    if is_string and "format" in schema and schema["format"] not in STRING_FORMATS:
        return f"`\"format\": {json.dumps(schema['format'])}` at {path}"
    if ("pattern" in schema or (is_string and "format" in schema)) and ("minLength" in schema or "maxLength" in schema):
        return f"`minLength`/`maxLength` together with `pattern` or `format` at {path}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"`allOf` with more than one schema at {path}"
    if "$ref" in schema:
        if not str(schema["$ref"]).startswith("#"):
            return f"a `$ref` to another document at {path}"
        beside = sorted(set(schema) - REF_SIBLINGS)
        if beside:
            return f"`{beside[0]}` beside `$ref` at {path}"
    for key in _ONE:
        if isinstance(schema.get(key), dict) and (found := unsupported_feature(schema[key], f"{path}/{key}")):
            return found
    for key in _LIST:
        if isinstance(schema.get(key), list):
            for index, sub in enumerate(schema[key]):
                if found := unsupported_feature(sub, f"{path}/{key}/{index}"):
                    return found
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                if found := unsupported_feature(sub, f"{path}/{key}/{_pointer(name)}"):
                    return found
    return None


def _pointer(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def _load(text: str | None, what: str, param: str) -> Any:
    if text is None:
        raise GrammarError(f"{what} is missing.", param=param)
    try:
        return json.loads(text)
    except ValueError as error:
        raise GrammarError(f"{what} is not valid JSON: {error}", param=param) from None


def _enforceable(schema: Any, what: str, param: str) -> None:
    if not isinstance(schema, dict | bool):
        raise GrammarError(f"{what} must be a JSON schema (an object), not {json.dumps(schema)[:80]}.", param=param)
    if found := unsupported_feature(schema):
        raise GrammarError(f"{what} uses {found}, which constrained decoding cannot enforce.", param=param)


def json_schema(spec: GrammarSpec) -> Any:
    """A json_schema spec's schema, parsed and checked."""
    what = "response_format.json_schema.schema"
    schema = _load(spec.schema, what, "response_format")
    _enforceable(schema, what, "response_format")
    return schema


def tools(spec: GrammarSpec) -> list[Tool]:
    """The tools a tool_call spec may call: `tool_name` alone where set, else all; checked."""
    listed = _load(spec.tools, "tools", "tools")
    if not isinstance(listed, list) or not listed:
        raise GrammarError("tools must be a non-empty list of functions.", param="tools")
    chosen: list[Tool] = []
    for index, tool in enumerate(listed):
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not name:
            raise GrammarError(f"tools[{index}].function.name must be a non-empty string.", param="tools")
        if spec.tool_name is not None and name != spec.tool_name:
            continue
        what = f"tools[{index}].function.parameters"
        parameters = tool.get("parameters")
        parameters = NO_PARAMETERS if parameters is None else parameters
        _enforceable(parameters, what, "tools")
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise GrammarError(f"{what} must be a JSON schema of an object (its arguments).", param="tools")
        chosen.append(Tool(name, parameters))
    if not chosen:
        raise GrammarError(f"tool_choice names the function {spec.tool_name!r}, which is not in tools.",
                           param="tool_choice")
    return chosen


def check(spec: GrammarSpec) -> None:
    """Raise `GrammarError` where `spec` is malformed or uses what the grammar would not enforce.
    A spec that passes may still fail to compile (an invalid regex `pattern`, say): the compiler
    reports that as a `GrammarError` too."""
    if spec.kind == "json_schema":
        json_schema(spec)
    elif spec.kind == "tool_call":
        tools(spec)
