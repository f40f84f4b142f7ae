"""Prompter: a chat request rendered with the model's chat template and tokenized, its limits checked.

Needs only the model's processor (tokenizer, chat template, image token rules), not the model, so
the model replica can prepare requests in its own process while the engine runs in another
(deployments/engine_process.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.errors import ContextLengthError, InvalidRequestError
from serve_app.settings import ModelSettings
from serve_app.stage_types import GenerationRequest, SamplingParams


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

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


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

    def render(self, request: GenerationRequest) -> str:
        """The conversation as the model's chat template writes it, one image token per image."""
        messages = [m.as_template_message() for m in request.messages]
        if self.settings.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.settings.system_prompt}]})
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **self._template_kwargs
        )

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        prompt = self.render(request)
        pieces = prompt.split(self.image_token)
        if len(pieces) - 1 != len(request.images):
            raise InvalidRequestError(
                f"The prompt has {len(pieces) - 1} image placeholders for {len(request.images)} images."
            )
        # Each image placeholder becomes as many image tokens as its patch grid yields after merging.
        grids = [image.grid_thw for image in request.images]
        expanded = pieces[0]
        for index, piece in enumerate(pieces[1:]):
            expanded += self.processor.replace_image_token({"image_grid_thw": torch.tensor(grids)}, index) + piece
        input_ids: list[int] = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

        limit = self.settings.max_model_len
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
        )
