"""The typed objects the deployments hand each other through Ray handles.

Dataclasses rather than pydantic models: they carry tensors, never touch the wire, and Ray pickles
them as they are.
"""

from __future__ import annotations

import json
import uuid
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is the model side's: the ingress imports these types without it
    import torch


@dataclass(frozen=True)
class ImageInput:
    """One `image_url` part of a request, and where it sits in it (for error messages)."""

    url: str
    param: str
    detail: Literal["auto", "low", "high"] = "auto"
    min_pixels: int | None = None  # extension: the client's own resolution bounds, checked by the
    max_pixels: int | None = None  # preprocessor against the operator's limits


@dataclass(frozen=True)
class PreprocessedImage:
    """Model-ready tensors for one image, made on a CPU replica."""

    pixel_values: torch.Tensor  # (patches, channels * temporal * patch * patch), float32 or the model's dtype
    grid_thw: tuple[int, int, int]  # patch grid (time, height, width) before the 2x2 merge
    width: int  # size after decoding and resizing, before the model's processor
    height: int
    tokens: int  # image tokens it becomes in the prompt (the grid after merging)

    def __reduce__(self):
        import torch

        # The pixels travel as a numpy array: Ray hands those through its object store without copying
        # them (pickle protocol 5 buffers), where it pickles a torch tensor through torch.save and
        # reads it back through torch.load (~2 ms of the model replica's GIL per 448x448 image on the
        # GPU machine, benchmarks/RESULTS.md run G1). numpy has no bfloat16: such pixels go as int16.
        pixels = self.pixel_values.detach().cpu()
        as_numpy = (pixels.view(torch.int16) if pixels.dtype == torch.bfloat16 else pixels).numpy()
        return _rebuild_image, (as_numpy, pixels.dtype, self.grid_thw, self.width, self.height, self.tokens)


def _rebuild_image(pixels, dtype: torch.dtype, grid_thw: tuple[int, int, int], width: int, height: int,
                   tokens: int) -> PreprocessedImage:
    import torch

    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; nothing writes pixels in place
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(pixels)
    return PreprocessedImage(tensor.view(dtype) if dtype == torch.bfloat16 else tensor, grid_thw, width, height, tokens)


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """Where an image goes in the conversation; the tensors travel in GenerationRequest.images."""

    type: Literal["image"] = "image"


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made, as a template renders it back into the prompt."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI carries it


@dataclass(frozen=True)
class PromptMessage:
    role: Literal["system", "user", "assistant", "tool"]
    parts: tuple[TextPart | ImagePart, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def as_template_message(self) -> dict:
        """The shape chat templates expect: {"role", "content": [{"type": "text"|"image", ...}]}, plus
        "tool_calls" ({"id", "type", "function": {"name", "arguments": dict or str}}) and "tool_call_id"."""
        content = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in self.parts]
        message: dict = {"role": self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": _arguments(call)}}
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(call: ToolCall) -> dict | str:
    """A call's arguments as a dict where they are a JSON object (GLM's template iterates them)."""
    try:
        parsed = json.loads(call.arguments)
    except ValueError:
        return call.arguments
    return parsed if isinstance(parsed, dict) else call.arguments


@dataclass(frozen=True)
class GrammarSpec:
    """What constrained decoding must produce (engine/grammar compiles it; the ingress validated it).

    - "json_object": any JSON object;
    - "json_schema": JSON matching `schema` (canonical JSON text of the schema);
    - "tool_call": one call in the model's tool-call markup to one of `tools` (canonical JSON text of
      the OpenAI function definitions, [{"name", "description", "parameters"}, ...]), or to `tool_name`
      only when set (tool_choice naming a function).
    """

    kind: Literal["json_object", "json_schema", "tool_call"]
    schema: str | None = None
    tools: str | None = None
    tool_name: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None  # None: as many as the context window and the model's default allow
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off; as transformers applies it, over prompt and output tokens
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; else how many top alternatives per token (0..20)
    grammar: GrammarSpec | None = None  # None: unconstrained

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    messages: list[PromptMessage]
    images: list[PreprocessedImage]
    sampling: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tools: list[dict] | None = None  # OpenAI function definitions, rendered by the chat template
    n: int = 1  # choices: the engine prefills the prompt once and samples n rows from it
    # Requests share prefix-cached KV blocks only with requests of the same salt (None: the shared default).
    cache_salt: str | None = None
    # The conversation's first turn, hashed (deployments/affinity_router.py): the prefix-affinity request
    # router sends equal keys to one model replica, where the earlier turns' KV blocks are. None: any replica.
    routing_key: str | None = None


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability (from the logits the sampler used) and its top alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """New text of one choice of a request since its last chunk; each choice's last chunk carries
    finish_reason. `logprobs`: one entry per token sampled since the choice's last chunk, when asked."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"] | None = None
    image_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV blocks came from the prefix cache
    choice: int = 0  # which of the request's n choices
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class CacheStats:
    """An engine's cache figures since it started (cumulative, for counters), and the encoder cache's
    bytes now: prompt tokens looked up in the prefix cache and found there, images whose features were
    looked up in the encoder cache and found there."""

    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    encoder_queried_images: int = 0
    encoder_hit_images: int = 0
    encoder_cache_bytes: int = 0


@dataclass(frozen=True)
class LimitState:
    """One budget as the `x-ratelimit-*` headers report it."""

    limit: int
    remaining: int
    reset_s: float  # until the whole budget is free again


@dataclass(frozen=True)
class RateDecision:
    """The RateLimiter's answer to one request."""

    admitted: bool
    reservation: str | None  # random, so it never matches a reservation of a restarted limiter
    retry_after_s: float
    requests: LimitState | None
    tokens: LimitState | None


@dataclass(frozen=True)
class ModelInfo:
    """What the model stage tells the ingress about the model it serves."""

    id: str
    aliases: list[str]
    quantization: str
    max_model_len: int
    device: str
    token_budget: int | None  # what the replica admits in flight; None: unbounded
    max_images_in_flight: int | None
    # What a request's left-out sampling fields get: temperature, top_p, top_k, repetition_penalty where
    # the model sets them (generation_config.json, then its YAML), and max_tokens.
    generation_defaults: dict[str, float | int] = field(default_factory=dict)
    # Messages with more characters of text than this cannot fit in max_model_len tokens.
    max_prompt_chars: int | None = None
