"""Turn an OpenAI chat request into the model stage's prompt messages and image list."""

from __future__ import annotations

from collections.abc import Mapping

from serve_app.errors import ContextLengthError, InvalidRequestError
from serve_app.openai.protocol import (
    ChatCompletionContentPartImage,
    ChatCompletionRequest,
    ChatCompletionUserMessage,
)
from serve_app.settings import IngressSettings
from serve_app.stage_types import ImageInput, ImagePart, PromptMessage, SamplingParams, TextPart


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
        messages.append(PromptMessage(role=role, parts=tuple(parts)))
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
    (ModelInfo.generation_defaults), else OpenAI's."""
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
    )


def text_chars(request: ChatCompletionRequest) -> int:
    """Characters of text in the request's messages."""
    chars = 0
    for message in request.messages:
        if isinstance(message.content, str):
            chars += len(message.content)
        elif message.content:
            chars += sum(len(part.text) for part in message.content if not isinstance(part, ChatCompletionContentPartImage))
    return chars


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
    return text_chars(request) // _CHARS_PER_TOKEN + images * _TOKENS_PER_IMAGE + completion
