"""OpenAI's chat-completions wire shapes, named as OpenAI names them.

Unknown request fields are ignored (as vLLM does), so clients that send newer OpenAI parameters
keep working. Extensions beyond OpenAI are few and documented on their field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from serve_app.settings import GREEDY_BELOW_TEMPERATURE


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- request ---------------------------------------------------------------------------------


class ImageURL(_Request):
    url: str = Field(min_length=1, description="An http(s) URL or a data:image/...;base64, URL.")
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="'low': a small fixed budget; 'high': the server's maximum; 'auto': by the image's size."
    )
    min_pixels: int | None = Field(None, gt=0, description="Extension: fewest pixels the image is resized to.")
    max_pixels: int | None = Field(
        None, gt=0, description="Extension: most pixels the image is resized to (within the server's limits)."
    )

    @model_validator(mode="after")
    def _bounds_in_order(self) -> ImageURL:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        return self


class ChatCompletionContentPartText(_Request):
    type: Literal["text"]
    text: str


class ChatCompletionContentPartImage(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[
    ChatCompletionContentPartText | ChatCompletionContentPartImage, Field(discriminator="type")
]


class ChatCompletionSystemMessage(_Request):
    role: Literal["system", "developer"]
    content: str | list[ChatCompletionContentPartText]
    name: str | None = None


class ChatCompletionUserMessage(_Request):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class FunctionCallParam(_Request):
    name: str
    arguments: str = Field(description="The call's arguments: a JSON object, as text.")

    @field_validator("arguments")
    @classmethod
    def _a_json_object(cls, value: str) -> str:
        # The chat template writes each argument as a key and a value, so they must be an object's.
        if not value.strip():
            return "{}"
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):  # a ValueError: pydantic reports those as the field's error
            raise ValueError("arguments must be a JSON object, as text")  # noqa: TRY004
        return value


class ChatCompletionMessageToolCallParam(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatCompletionAssistantMessage(_Request):
    role: Literal["assistant"]
    content: str | list[ChatCompletionContentPartText] | None = None
    name: str | None = None
    tool_calls: list[ChatCompletionMessageToolCallParam] | None = None


class ChatCompletionToolMessage(_Request):
    role: Literal["tool"]
    content: str | list[ChatCompletionContentPartText]
    tool_call_id: str


ChatCompletionMessageParam = Annotated[
    ChatCompletionSystemMessage | ChatCompletionUserMessage | ChatCompletionAssistantMessage | ChatCompletionToolMessage,
    Field(discriminator="role"),
]


# OpenAI's rule for function names; it also keeps them apart from the tool-call markup around them.
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(_Request):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments object.")
    strict: bool | None = Field(
        None, description="Accepted; calls that the server enforces (tool_choice required or a named function) "
        "always follow `parameters`.",
    )


class ChatCompletionTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class ChatCompletionNamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


# Tagged by the JSON type, with tags that error locations leave out (errors_http.param_from_loc), so an
# error inside a named choice is reported as `tool_choice.function.name`.
ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("str")] | Annotated[ChatCompletionNamedToolChoice, Tag("dict")],
    Discriminator(lambda value: "str" if isinstance(value, str) else "dict"),
]


class JSONSchema(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="A JSON Schema the answer matches.")
    strict: bool | None = Field(None, description="Accepted; the answer always matches the schema.")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class StreamOptions(_Request):
    include_usage: bool = False


# Stop sequences per request (OpenAI's limit), and characters per stop sequence: the engine holds back
# up to that much text at every step of every sequence to find them.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
# Seeds are 64-bit signed integers, as torch's generators (and vLLM) take them.
_INT64 = 2**63
MAX_CACHE_SALT_CHARS = 256


class ChatCompletionRequest(_Request):
    """Sampling fields left out (None) take the served model's defaults (`generation_defaults` in
    `/v1/models`), else OpenAI's: temperature 1, top_p 1, no top_k, no repetition penalty."""

    model: str
    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer max_tokens.")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description=f"0 (or below {GREEDY_BELOW_TEMPERATURE:g}): greedy decoding."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(
        1, ge=1, description="Choices to generate from one prefill of the prompt, up to the server's max_n."
    )
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} sequences of up to {MAX_STOP_CHARS} characters."
    )
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: decoding is constrained so that the answer parses (and "
        "matches the schema).",
    )
    tools: list[ChatCompletionTool] | None = None
    tool_choice: ToolChoice | None = Field(
        None, description="Default: 'auto' with tools, 'none' without. 'none' leaves the tools out of the prompt; "
        "'required' and a named function are enforced by constrained decoding.",
    )
    parallel_tool_calls: bool | None = Field(None, description="Accepted; an enforced tool_choice makes one call.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Extensions (vLLM's names): force a fixed completion length so benchmarks are comparable.
    min_tokens: int = Field(0, ge=0, description="Extension: generate at least this many tokens.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence.")
    # Extensions (vLLM's names and meanings): sampling controls OpenAI's API does not have.
    top_k: int | None = Field(
        None, ge=-1, lt=2**31, description="Extension: sample among the k likeliest tokens; 0 or -1: all of them."
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=2.0,
        description="Extension: divide the logits of tokens already in the prompt or the answer by this "
        "(multiply the negative ones), as transformers does; 1: off.",
    )
    # Extension (vLLM's name and meaning): prefix-cache isolation between tenants.
    cache_salt: str | None = Field(
        None, min_length=1, max_length=MAX_CACHE_SALT_CHARS,
        description="Extension: requests reuse each other's cached prompt prefix (usage.prompt_tokens_details."
        "cached_tokens) only when their cache_salt is the same; a secret salt per tenant keeps others from "
        f"sharing, or timing, its cache. Up to {MAX_CACHE_SALT_CHARS} characters.",
    )

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, value: float | None) -> float | None:
        # Dividing logits by a smaller temperature overflows; vLLM samples greedily below it too.
        return 0.0 if value is not None and value < GREEDY_BELOW_TEMPERATURE else value

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int | None) -> int | None:
        return 0 if value == -1 else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters long")
        return stops

    @field_validator("tools")
    @classmethod
    def _names_unique(cls, tools: list[ChatCompletionTool] | None) -> list[ChatCompletionTool] | None:
        names = [tool.function.name for tool in tools or []]
        if len(set(names)) < len(names):
            raise ValueError("function names must be unique within tools")
        return tools

    # Fields are validated in the order they are declared: `tools` and `logprobs` are in `info.data` here
    # (unless they failed themselves), so these errors name the parameter that is wrong.
    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        if "tools" not in info.data or value in (None, "none", "auto"):
            return value
        names = [tool.function.name for tool in info.data["tools"] or []]
        if not names:
            raise ValueError("tool_choice requires tools")
        if isinstance(value, ChatCompletionNamedToolChoice) and value.function.name not in names:
            raise ValueError(f"tool_choice names the function {value.function.name!r}, which is not in tools")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @model_validator(mode="after")
    def _usage_needs_stream(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_sequences(self) -> list[str]:
        return list(self.stop or [])

    @property
    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | ChatCompletionNamedToolChoice:
        """tool_choice as OpenAI defaults it: 'auto' when there are tools, 'none' when there are none."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


# ---- response --------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # Extension: how many prompt tokens the images became, so clients see what a resolution costs.
    image_tokens: int = 0


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, image_tokens: int,
           cached_tokens: int = 0) -> CompletionUsage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens, image_tokens=image_tokens),
        )


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None


class Function(BaseModel):
    name: str
    arguments: str  # JSON text


class ChatCompletionMessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: Function


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # Left out of the body when there are none, as OpenAI does.
    tool_calls: list[ChatCompletionMessageToolCall] | None = Field(None, exclude_if=lambda calls: calls is None)


class Choice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ChoiceDeltaToolCallFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(BaseModel):
    index: int  # the call's place among the choice's calls
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChoiceDeltaToolCallFunction | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extension: how the weights are stored ("none", "gptq-4bit", ...), so clients can tell.
    quantization: str = "none"
    max_model_len: int | None = None
    # Extension: what a request's left-out fields get (temperature, top_p, top_k, repetition_penalty
    # where the model sets them; max_tokens), from the model's generation_config.json and its YAML.
    generation_defaults: dict[str, int | float] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
