"""Function calls in GLM-4.5V/4.6V's tool-call markup, read out of the model's text.

GLM's chat template teaches the model to call a function by writing

    <tool_call>NAME
    <arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>
    ...
    </tool_call>

(vLLM's `glm4_moe` tool parser reads the same). Both readers here follow one set of rules, so a streamed
answer yields the same content and calls as the whole text does:

- A call is `<tool_call>` up to the first `</tool_call>`; the name is what precedes the first `<arg_key>`,
  stripped. Whitespace touching a call is part of its markup (the template writes a newline before each
  call). A `<tool_call>` that is never closed stays in the content, as the model wrote it.
- A value is JSON where it parses as JSON and its parameter is not string-typed in the function's schema,
  else the text itself (keys and values stripped, as vLLM does). The arguments are a JSON object's text.
- Every call gets an id `call_<random hex>`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

START = "<tool_call>"
END = "</tool_call>"
_CALL = re.compile(r"\s*<tool_call>(.*?)</tool_call>\s*", re.DOTALL)
_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

# Each function's `parameters` schema by name (None: the function declared none).
Parameters = Mapping[str, dict[str, Any] | None]


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # None when the answer is only calls, as OpenAI reports it
    calls: list[ParsedCall]


def parse_tool_calls(text: str, parameters: Parameters) -> ParsedOutput:
    """The content outside calls and the calls in a whole answer."""
    calls = [_call(match.group(1), parameters) for match in _CALL.finditer(text)]
    content = _CALL.sub("", text)
    return ParsedOutput(content if content or not calls else None, calls)


class ToolCallStream:
    """The same reading of an answer that arrives in pieces.

    `feed` returns the content that is certain not to belong to a call and the calls completed so far;
    text that may still turn out to be markup (whitespace, a prefix of `<tool_call>`, an open call) is held
    back until it is known. `finish` returns what is held back when the answer ends.
    """

    def __init__(self, parameters: Parameters) -> None:
        self._parameters = parameters
        self._held = ""  # from the first character that may belong to a call
        self._in_call = False  # `_held` starts with whitespace and `<tool_call>`
        self._after_call = False  # whitespace right after a call is still the call's
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._held += text
        content: list[str] = []
        calls: list[ParsedCall] = []
        while self._held:
            if self._in_call:
                end = self._held.find(END)
                if end < 0:
                    break
                body = self._held[self._held.index(START) + len(START):end]
                calls.append(_call(body, self._parameters))
                self._held = self._held[end + len(END):]
                self._in_call, self._after_call = False, True
                continue
            if self._after_call:
                self._held = self._held.lstrip()
                if not self._held:
                    break
                self._after_call = False
            start = self._held.find(START)
            if start >= 0:
                cut = len(self._held[:start].rstrip())
                self._in_call = True
            else:
                cut = len(self._held[:len(self._held) - _partial_start(self._held)].rstrip())
            content.append(self._held[:cut])
            self._held = self._held[cut:]
            if not self._in_call:
                break
        self.calls += len(calls)
        return "".join(content), calls

    def finish(self) -> str:
        """The held-back text: trailing whitespace, a partial `<tool_call>`, or a call never closed."""
        held, self._held = self._held, ""
        return held


def _partial_start(text: str) -> int:
    """Length of the longest end of `text` that `<tool_call>` starts with."""
    for size in range(min(len(START) - 1, len(text)), 0, -1):
        if text.endswith(START[:size]):
            return size
    return 0


def _call(body: str, parameters: Parameters) -> ParsedCall:
    name = body.split("<arg_key>", 1)[0].strip()
    schema = parameters.get(name) or {}
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    arguments = {
        key.strip(): _value(value.strip(), properties.get(key.strip()))
        for key, value in _ARGUMENT.findall(body)
    }
    return ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))


def _value(text: str, schema: Any) -> Any:
    if _string_typed(schema):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _string_typed(schema: Any) -> bool:
    kind = schema.get("type") if isinstance(schema, dict) else None
    return kind == "string" or (isinstance(kind, list) and "string" in kind)
