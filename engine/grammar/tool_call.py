"""The grammar of one tool call in GLM-4.5V/4.6V's markup, as an xgrammar structural tag.

GLM-4.5V's and GLM-4.6V's chat templates write an assistant's call as

    <tool_call>NAME
    <arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>
    ...
    </tool_call>

one key/value pair per argument, a string argument's value as raw text and any other as JSON
(`v | tojson if v is not string else v`). xgrammar's "glm_xml" JSON-schema style is exactly this
key/value markup, driven by the function's parameter schema: its properties in declared order,
the required ones present, no others, each value per its schema. It allows whitespace between the
tags; `max_whitespace_cnt=1` keeps that to GLM's single newline (or none), so a small model cannot
pad a call with endless blank lines.

The call is the whole output: after `</tool_call>` only end-of-sequence is allowed.
"""

from __future__ import annotations

from engine.grammar.specs import Tool

BEGIN = "<tool_call>"
END = "</tool_call>"


def tool_call_tag(tools: list[Tool]) -> dict:
    """The structural tag (xgrammar's JSON form) for exactly one call to one of `tools`.

    The newline after NAME ends the name, so that of two tools where one name begins the other
    (`get`, `get_weather`) each call is read as the one it names.
    """
    tags = [
        {
            "type": "tag",
            "begin": f"{BEGIN}{tool.name}\n",
            "content": {"type": "json_schema", "json_schema": tool.parameters, "style": "glm_xml",
                        "max_whitespace_cnt": 1},
            "end": END,
        }
        for tool in tools
    ]
    return {"type": "structural_tag", "format": tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}}
