"""The tool_call grammar on the demo tokenizer: exactly one call in GLM-4.5V/4.6V's markup."""

from __future__ import annotations

import json

import pytest

from engine.grammar.compiler import GrammarCompiler
from serve_app.stage_types import GrammarSpec
from tests.engine.grammar.conftest import accepts

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {"enum": ["C", "F"]},
                       "options": {"type": "object", "properties": {"hourly": {"type": "boolean"}}}},
        "required": ["city", "days"],
    },
}
GET = {"name": "get", "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}
PING = {"name": "ping"}  # no parameters: a call without arguments
TOOLS = json.dumps([WEATHER, GET, PING])


def call(name: str, **arguments) -> str:
    """A call as GLM-4.5V's and GLM-4.6V's chat templates render one: a string argument as raw text, any other
    as JSON, each key and value on its own line."""
    text = f"<tool_call>{name}\n"
    for key, value in arguments.items():
        text += f"<arg_key>{key}</arg_key>\n<arg_value>{value if isinstance(value, str) else json.dumps(value)}</arg_value>\n"
    return text + "</tool_call>"


@pytest.fixture
def forced(compiler: GrammarCompiler, tokenizer):
    return lambda text: accepts(compiler, tokenizer, GrammarSpec("tool_call", tools=TOOLS, tool_name="get_weather"), text)


def test_the_templates_rendering_of_a_call_is_accepted(forced) -> None:
    assert forced(call("get_weather", city="Paris", days=3))
    assert forced(call("get_weather", city="São Paulo, \"centre\"", days=3, units="F", options={"hourly": True}))
    # Between the tags one whitespace character or none; the newline after the name ends the name.
    assert forced(call("get_weather", city="Paris", days=3).replace(">\n<", "><"))
    assert not forced(call("get_weather", city="Paris", days=3).replace("\n", "\n\n"))
    assert not forced(call("get_weather", city="Paris", days=3).replace("get_weather\n", "get_weather"))


def test_required_arguments_come_in_order_and_nothing_else(forced) -> None:
    assert not forced(call("get_weather", city="Paris"))
    assert not forced(call("get_weather", days=3, city="Paris"))
    assert not forced(call("get_weather", city="Paris", days=3, country="FR"))
    assert not forced(call("get_weather", city="Paris", days="three"))
    assert not forced(call("get_weather", city="Paris", days=3, units="K"))


def test_one_call_and_nothing_around_it(forced) -> None:
    assert not forced("Sure. " + call("get_weather", city="Paris", days=3))
    assert not forced(call("get_weather", city="Paris", days=3) + "\n" + call("get_weather", city="Oslo", days=1))
    assert not forced(call("get_weather", city="Paris", days=3)[:-1])


def test_a_named_tool_is_the_only_one_callable(forced, compiler: GrammarCompiler, tokenizer) -> None:
    assert not forced(call("get", key="a"))
    any_tool = GrammarSpec("tool_call", tools=TOOLS)
    assert accepts(compiler, tokenizer, any_tool, call("get_weather", city="Paris", days=3))
    assert accepts(compiler, tokenizer, any_tool, call("get", key="a"))
    assert accepts(compiler, tokenizer, any_tool, call("ping"))
    assert not accepts(compiler, tokenizer, any_tool, call("pong"))
    # The newline ends the name: `get` with get_weather's arguments is no call.
    assert not accepts(compiler, tokenizer, any_tool, call("get", city="Paris", days=3))
