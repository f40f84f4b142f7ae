"""The prompt format shared by training and evaluation: the serving chat template over one user turn.

Training and evaluation build their prompts here so that the model learns and is scored on exactly
what the server renders for a client's request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EOS = "<|endoftext|>"

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer the question about the picture briefly.",
)


@dataclass(frozen=True)
class PromptStyle:
    """How a client laid out its message: image before or after the text, system prompt or not."""

    image_first: bool = True
    system: str | None = None


def build_prompt(processor: Any, question: str, style: PromptStyle = PromptStyle(), image: bool = True) -> str:
    """The serving prompt: the chat template over one user turn holding an image and a question.

    `image=False` renders a text-only turn, as the server does for a request without an image.
    """
    picture, text = {"type": "image"}, {"type": "text", "text": question}
    content = ([picture, text] if style.image_first else [text, picture]) if image else [text]
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if style.system:
        messages.insert(0, {"role": "system", "content": style.system})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
