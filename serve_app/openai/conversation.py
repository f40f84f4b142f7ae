"""Turn an OpenAI chat request into what the model stage takes: prompt messages, images, tools to
render, sampling parameters (with the grammar that constrains decoding) and the number of choices.

Tools and tool_choice:
- "auto" (the default with tools): the chat template renders the tools; the model's own tool-call markup
  is read from its answer (serve_app/openai/choices.py).
- "required" or a named function: rendered too, and a grammar (kind "tool_call") makes the answer one call.
- "none": the tools are not rendered at all, so the model has nothing to call (vLLM renders them unless
  told not to, with --exclude-tools-when-tool-choice-none); calls and results already in the
  conversation are still rendered.
A forced call wins over response_format: the answer is the call, and has no content to shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from serve_app.errors import ContextLengthError, InvalidRequestError
from serve_app.openai.protocol import (
    ChatCompletionAssistantMessage,
    ChatCompletionContentPartImage,
    ChatCompletionRequest,
    ChatCompletionToolMessage,
    ChatCompletionUserMessage,
)
from serve_app.settings import IngressSettings
from serve_app.stage_types import (
    GrammarSpec,
    ImageInput,
    ImagePart,
    PromptMessage,
    SamplingParams,
    TextPart,
    ToolCall,
)


def split_request(
    request: ChatCompletionRequest, limits: IngressSettings
) -> tuple[list[PromptMessage], list[ImageInput]]:
    """The conversation with image placeholders, and the images in the order they appear."""
    if len(request.messages) > limits.max_messages:
        raise InvalidRequestError(
            f"Too many messages: {len(request.messages)} (the limit is {limits.max_messages}).",
            param="messages",
            code="too_many_messages",
        )
    messages: list[PromptMessage] = []
    images: list[ImageInput] = []
    for i, message in enumerate(request.messages):
        content = message.content
        if content is None or isinstance(content, str):
            parts: list[TextPart | ImagePart] = [TextPart(content or "")]
        else:
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, ChatCompletionContentPartImage):
                    image = part.image_url
                    images.append(ImageInput(image.url, f"messages[{i}].content[{j}]", image.detail,
                                             image.min_pixels, image.max_pixels))
                    parts.append(ImagePart())
                else:
                    parts.append(TextPart(part.text))
        role = "system" if message.role == "developer" else message.role
        made = (message.tool_calls or []) if isinstance(message, ChatCompletionAssistantMessage) else []
        calls = tuple(ToolCall(call.id, call.function.name, call.function.arguments) for call in made)
        answers = message.tool_call_id if isinstance(message, ChatCompletionToolMessage) else None
        messages.append(PromptMessage(role=role, parts=tuple(parts), tool_calls=calls, tool_call_id=answers))
    if len(images) > limits.max_images_per_request:
        raise InvalidRequestError(
            f"Too many images: {len(images)} (the limit is {limits.max_images_per_request} per request).",
            param="messages",
            code="too_many_images",
        )
    if not any(isinstance(m, ChatCompletionUserMessage) for m in request.messages):
        raise InvalidRequestError("The conversation needs at least one user message.", param="messages")
    return messages, images


def check_prompt_length(request: ChatCompletionRequest, max_prompt_chars: int | None, max_model_len: int) -> None:
    """Refuse messages with more text than the context window can hold, before anything tokenizes them.

    `max_prompt_chars` comes from the model stage: max_model_len times the characters its longest
    token stands for (no token stands for more), so text over it is sure not to fit.
    """
    chars = text_chars(request)
    if max_prompt_chars is not None and chars > max_prompt_chars:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, your messages have "
            f"{chars} characters, more than {max_model_len} tokens can hold. Please reduce the length of the messages.",
            param="messages",
        )


def sampling_params(
    request: ChatCompletionRequest, limits: IngressSettings, defaults: Mapping[str, float] | None = None
) -> SamplingParams:
    """The request's sampling values; a field it leaves out takes the model's default from `defaults`
    (ModelInfo.generation_defaults), else OpenAI's. With them: how many logprobs to report per token
    (None: none) and the grammar that constrains decoding (see `grammar`)."""
    max_tokens = request.requested_max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens_ceiling:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise InvalidRequestError(
            f"{param} is {max_tokens}, above this server's limit of {limits.max_tokens_ceiling}.",
            param=param,
            code="invalid_value",
        )
    if request.min_tokens and max_tokens is not None and request.min_tokens > max_tokens:
        raise InvalidRequestError("min_tokens must not exceed max_tokens.", param="min_tokens")
    model = defaults or {}

    def pick(name: str, openai_default: float) -> float:
        asked = getattr(request, name)
        return asked if asked is not None else model.get(name, openai_default)

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=int(pick("top_k", 0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        stop=tuple(request.stop_sequences),
        seed=request.seed,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        grammar=bounded_grammar(request, limits),
    )


def bounded_grammar(request: ChatCompletionRequest, limits: IngressSettings) -> GrammarSpec | None:
    """`grammar(request)`, refused (400) where its schema or tools are longer than `max_grammar_chars`:
    the model stage compiles it, in CPU time that grows with its size."""
    spec = grammar(request)
    text = spec and (spec.schema or spec.tools)
    if text and len(text) > limits.max_grammar_chars:
        raise InvalidRequestError(
            f"The grammar this request constrains decoding with is {len(text)} characters of JSON, above this "
            f"server's limit of {limits.max_grammar_chars}.",
            param=grammar_param(request), code="invalid_value",
        )
    return spec


def choices(request: ChatCompletionRequest, limits: IngressSettings) -> int:
    """How many choices the request asks for (`n`), within the server's `max_n`."""
    if request.n > limits.max_n:
        raise InvalidRequestError(
            f"n is {request.n}, above this server's limit of {limits.max_n}.", param="n", code="invalid_value"
        )
    return request.n


def canonical_json(value: Any) -> str:
    """One text per JSON value, whatever its key order or spacing, so that equal grammars share a cache entry."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def grammar(request: ChatCompletionRequest) -> GrammarSpec | None:
    """What constrained decoding must produce: one call when tool_choice forces it ("required": to any of
    the tools; a named function: to it), else JSON when response_format asks for it, else nothing."""
    choice = request.effective_tool_choice
    if choice not in ("none", "auto") and request.tools:
        functions = [tool.function.model_dump(exclude_none=True, exclude={"strict"}) for tool in request.tools]
        name = None if choice == "required" else choice.function.name
        return GrammarSpec("tool_call", tools=canonical_json(functions), tool_name=name)
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object" or response_format.json_schema is None:
        return GrammarSpec("json_object")
    return GrammarSpec("json_schema", schema=canonical_json(response_format.json_schema.schema_))


def grammar_param(request: ChatCompletionRequest) -> str | None:
    """The parameter a grammar came from, for an error that the model stage reports about it (a schema the
    grammar engine cannot compile): what `grammar(request)` was made from."""
    spec = grammar(request)
    if spec is None:
        return None
    return {"tool_call": "tools", "json_schema": "response_format.json_schema.schema"}.get(spec.kind, "response_format")


def template_tools(request: ChatCompletionRequest) -> list[dict] | None:
    """The tools the chat template renders, as OpenAI function tools; None with tool_choice "none"."""
    if not request.tools or request.effective_tool_choice == "none":
        return None
    return [tool.model_dump(exclude_none=True, exclude={"function": {"strict"}}) for tool in request.tools]


def text_chars(request: ChatCompletionRequest) -> int:
    """Characters of text in the request's messages, their tool calls and the tools the prompt renders."""
    chars = 0
    for message in request.messages:
        if isinstance(message.content, str):
            chars += len(message.content)
        elif message.content:
            chars += sum(len(part.text) for part in message.content if not isinstance(part, ChatCompletionContentPartImage))
        if isinstance(message, ChatCompletionAssistantMessage):
            chars += sum(len(call.function.name) + len(call.function.arguments) for call in message.tool_calls or [])
    tools = template_tools(request)
    return chars + (len(json.dumps(tools, ensure_ascii=False)) if tools else 0)


# A rough upper estimate used only to reserve a token budget before the prompt is tokenized;
# the reservation is settled with the real usage when the answer is done.
_CHARS_PER_TOKEN = 3
_TOKENS_PER_IMAGE = 256


def estimate_tokens(request: ChatCompletionRequest, default_max_tokens: int) -> int:
    images = sum(
        isinstance(part, ChatCompletionContentPartImage)
        for message in request.messages if isinstance(message.content, list)
        for part in message.content
    )
    completion = request.requested_max_tokens or default_max_tokens
    return text_chars(request) // _CHARS_PER_TOKEN + images * _TOKENS_PER_IMAGE + completion * request.n
