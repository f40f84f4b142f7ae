"""Prompter: a chat request rendered with the model's chat template and tokenized, its limits checked.

Needs only the model's processor (tokenizer, chat template, image token rules), not the model, so
the model replica can prepare requests in its own process while the engine runs in another
(deployments/engine_process.py).

Two rules protect the replica and the conversation:
- Text is bounded before it is tokenized: a prompt with more characters than max_model_len tokens can
  hold is refused without tokenizing it, and tokenizing stops early once a prompt is sure to exceed
  its budget (tokenizing megabytes of text costs seconds of CPU and gigabytes of memory).
- Control tokens typed in messages (`<|user|>`, `<|assistant|>`, `<|image|>`, ...) are text: they are
  marked before the template runs and encoded as plain text, as transformers' `apply_chat_template(...,
  sanitize_control_tokens=True)` does, so only the template writes turns and image placeholders.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from transformers.utils.chat_template_utils import _CONTROL_TOKEN_START, mark_control_tokens

from engine.generation_defaults import resolve_generation_defaults
from serve_app.errors import ContextLengthError, InvalidRequestError
from serve_app.settings import ModelSettings
from serve_app.stage_types import GenerationRequest, PreprocessedImage, SamplingParams, TextPart

# Tokenizing a prefix of this many characters per token of budget first: ordinary text has fewer, so a
# prompt far over its budget is refused after tokenizing about its budget's worth of text.
_CHARS_PER_TOKEN_FIRST_WINDOW = 4
# A prefix cut inside a word may take a few more tokens than the whole word does.
_CUT_SLACK_TOKENS = 8


@dataclass
class PreparedRequest:
    """A request rendered and tokenized for the model, with its limits resolved."""

    input_ids: list[int]
    mm_token_type_ids: list[int] | None
    pixel_values: torch.Tensor | None
    image_grid_thw: list[tuple[int, int, int]]
    sampling: SamplingParams
    max_tokens: int
    image_tokens: int = 0
    # Set by the server when the client goes away; the engine drops the row at its next step.
    cancelled: bool = False
    # (group, index) of its row in an engine process (deployments/engine_process.py), once submitted.
    engine_row: tuple[int, int] | None = None
    # Which of its request's n choices this is; choices after the first name the first as `prompt_of`,
    # submitted in the same batch right after it: an engine may prefill their shared prompt once.
    choice: int = 0
    prompt_of: PreparedRequest | None = None
    # Each image's content digest (pixels and grid: prefix_cache.content_digest), which keys its prefix-
    # cache blocks and its encoder-cache entry; and the tenant salt of its prefix-cache keys.
    image_hashes: tuple[str, ...] = ()
    cache_salt: str | None = None

    def choices(self, n: int) -> list[PreparedRequest]:
        """This request as its n choices: itself, then n - 1 copies sharing its prompt."""
        return [self, *(replace(self, choice=i, prompt_of=self, cancelled=False, engine_row=None)
                        for i in range(1, n))]

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


def text_chars(request: GenerationRequest) -> int:
    return sum(len(part.text) for message in request.messages for part in message.parts if isinstance(part, TextPart))


class Prompter:
    def __init__(self, settings: ModelSettings, processor) -> None:
        self.settings = settings
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token: str = processor.image_token
        # GLM-4.5V/4.6V templates take `enable_thinking`; one that does not (the demo's, which never
        # thinks) would make transformers log a warning for every request it was passed to.
        template = str(getattr(processor, "chat_template", None) or "")
        self._template_kwargs = {"enable_thinking": False} if "enable_thinking" in template else {}
        # The tokens transformers' sanitize_control_tokens treats as control tokens: the special ones and
        # those the template writes. Longer ones first, so a token wins over the tokens inside it.
        control = sorted(self.tokenizer._get_control_tokens(template), key=len, reverse=True)
        self._control_tokens = re.compile("|".join(map(re.escape, control)) or "(?!)")
        # An image placeholder the template wrote, not one marked in user text.
        self._placeholder = re.compile(f"(?<!{_CONTROL_TOKEN_START}){re.escape(self.image_token)}")
        # No token stands for more characters of text than the longest one in the vocabulary (byte-level
        # vocabularies spell one byte per character, and a character is at least one byte), so text with
        # more than that many characters per token of the context window cannot fit.
        self.longest_token_chars = max(map(len, self.tokenizer.get_vocab()))
        self.max_prompt_chars = self.longest_token_chars * (settings.max_model_len - 1)

    @cached_property
    def sampling_defaults(self) -> dict[str, float | int]:
        """What a request's left-out fields get (temperature, top_p, top_k, repetition_penalty where set;
        max_tokens always), from the checkpoint's generation_config.json and the model YAML."""
        defaults = resolve_generation_defaults(self.settings).model_dump(exclude_none=True)
        return {**defaults, "max_tokens": self.settings.default_max_tokens}

    def _template_messages(self, request: GenerationRequest) -> list[dict]:
        messages = [m.as_template_message() for m in request.messages]
        if self.settings.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.settings.system_prompt}]})
        return messages

    def _apply_template(self, messages: list[dict], tools: list[dict] | None) -> str:
        # `tools` only when there are some: a template tells "no tools" by their absence.
        tool_kwargs = {"tools": tools} if tools else {}
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **tool_kwargs, **self._template_kwargs
        )

    def render(self, request: GenerationRequest) -> str:
        """The conversation (and its tools) as the model's chat template writes it, one image token per image."""
        return self._apply_template(self._template_messages(request), request.tools)

    def _too_long(self, found: str) -> ContextLengthError:
        return ContextLengthError(
            f"This model's maximum context length is {self.settings.max_model_len} tokens. However, {found}. "
            "Please reduce the length of the messages.",
            param="messages",
        )

    def _encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt; control tokens marked in user text are encoded as text."""
        return self.tokenizer(text, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]

    def _encode_within(self, text: str, budget: int) -> list[int] | None:
        """`text`'s ids, or None once they are sure to be more than `budget`: growing prefixes are
        tokenized first, so an oversized prompt costs about its budget's worth of tokenizing."""
        window = _CHARS_PER_TOKEN_FIRST_WINDOW * (budget + 1)
        while window < len(text):
            if len(self._encode(text[:window])) > budget + _CUT_SLACK_TOKENS:
                return None
            window *= 4
        ids = self._encode(text)
        return ids if len(ids) <= budget else None

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        limit = self.settings.max_model_len
        chars = text_chars(request)
        if chars > self.max_prompt_chars:
            raise self._too_long(f"your messages have {chars} characters, more than {limit} tokens can hold")

        prompt = self._apply_template(
            mark_control_tokens(self._template_messages(request), self._control_tokens),
            mark_control_tokens(request.tools, self._control_tokens) if request.tools else None,
        )
        pieces = self._placeholder.split(prompt)
        if len(pieces) - 1 != len(request.images):
            raise InvalidRequestError(
                f"The prompt has {len(pieces) - 1} image placeholders for {len(request.images)} images."
            )
        # Each image placeholder becomes as many image tokens as its patch grid yields after merging.
        grids = [image.grid_thw for image in request.images]
        expanded = pieces[0]
        for index, piece in enumerate(pieces[1:]):
            expanded += self.processor.replace_image_token({"image_grid_thw": torch.tensor(grids)}, index) + piece
        input_ids = self._encode_within(expanded, limit)
        if input_ids is None:
            raise self._too_long(f"your messages resulted in more than {limit} tokens")

        room = limit - len(input_ids)
        asked = request.sampling.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(input_ids) + (asked or 1)} tokens ({len(input_ids)} in the messages, "
                f"{asked or 1} in the completion). Please reduce the length of the messages or completion.",
                param="messages",
            )
        max_tokens = asked if asked is not None else min(self.settings.default_max_tokens, room)

        make_types = getattr(self.processor, "create_mm_token_type_ids", None)
        return PreparedRequest(
            input_ids=input_ids,
            mm_token_type_ids=make_types([input_ids])[0] if make_types else None,
            pixel_values=torch.cat([i.pixel_values for i in request.images]) if request.images else None,
            image_grid_thw=grids,
            sampling=request.sampling,
            max_tokens=max_tokens,
            image_tokens=sum(image.tokens for image in request.images),
            image_hashes=tuple(image_digest(image) for image in request.images),
            cache_salt=request.cache_salt,
        )


def image_digest(image: PreprocessedImage) -> str:
    """The content digest of one preprocessed image: its pixels as the model gets them and its grid
    (so the picture and the resolution it was processed at). sha256 over the tensor's own bytes,
    about 20 ms for a 1024x1024 image's 25 MB, on the worker thread that prepares the request."""
    pixels = image.pixel_values.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{pixels.dtype}|{tuple(pixels.shape)}|{tuple(image.grid_thw)}|".encode())
    digest.update(pixels.view(torch.uint8).numpy())  # hashlib reads the buffer without a copy
    return digest.hexdigest()
