"""The typed objects the deployments hand each other through Ray handles.

Dataclasses rather than pydantic models: they carry tensors, never touch the wire, and Ray pickles
them as they are.
"""

from __future__ import annotations

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
class PromptMessage:
    role: Literal["system", "user", "assistant"]
    parts: tuple[TextPart | ImagePart, ...]

    def as_template_message(self) -> dict:
        """The shape chat templates expect: {"role", "content": [{"type": "text"|"image", ...}]}."""
        content = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in self.parts]
        return {"role": self.role, "content": content}


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    messages: list[PromptMessage]
    images: list[PreprocessedImage]
    sampling: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class GenerationChunk:
    """New text of one request since its last chunk; the last chunk carries finish_reason."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"] | None = None
    image_tokens: int = 0


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
