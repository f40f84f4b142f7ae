"""OpenAI request shapes, conversion to prompt messages, and the error body mapping."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from serve_app.errors import (
    APIError,
    ImageError,
    InvalidRequestError,
    RateLimitError,
    unwrap,
)
from serve_app.openai.conversation import sampling_params, split_request
from serve_app.openai.errors_http import param_from_loc, validation_error
from serve_app.openai.protocol import ChatCompletionRequest
from serve_app.settings import IngressSettings
from serve_app.stage_types import ImagePart, TextPart

LIMITS = IngressSettings()


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_gpt4_vision_request_shape_parses() -> None:
    body = request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What's in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "high"}},
            ]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "text", "text": "Color?"}]},
        ],
        max_tokens=300, temperature=0.2, top_p=0.9, stop="END", seed=7, stream=True,
        stream_options={"include_usage": True}, response_format={"type": "text"},  # unknown fields ignored
    )
    messages, images = split_request(body, LIMITS)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1].parts == (TextPart("What's in this image?"), ImagePart())
    assert images[0].url == "https://example.com/a.jpg" and images[0].param == "messages[1].content[1]"
    params = sampling_params(body, LIMITS)
    assert (params.max_tokens, params.temperature, params.top_p, params.stop, params.seed) == (300, 0.2, 0.9, ("END",), 7)


def test_max_completion_tokens_is_accepted() -> None:
    assert sampling_params(request(max_completion_tokens=12), LIMITS).max_tokens == 12


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": {}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0].type"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ],
)
def test_schema_errors_name_the_param(fields: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        request(**fields)
    error = validation_error([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])
    assert error.status_code == 400
    assert error.param == param


def test_ceiling_on_max_tokens() -> None:
    with pytest.raises(InvalidRequestError) as info:
        sampling_params(request(max_tokens=10**6), LIMITS)
    assert info.value.param == "max_tokens"


def test_too_many_images() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    with pytest.raises(InvalidRequestError, match="Too many images"):
        split_request(request(messages=[{"role": "user", "content": [part] * 3}]), IngressSettings(max_images_per_request=2))


def test_param_from_loc_drops_union_tags() -> None:
    loc = ("body", "messages", 0, "user", "content", "list[...]", 1, "image_url", "image_url", "url")
    assert param_from_loc(loc) == "messages[0].content[1].image_url.url"
    assert param_from_loc(("body", "temperature")) == "temperature"


def test_errors_survive_pickling_like_a_ray_handle_does() -> None:
    for error in (ImageError("bad", "messages[0].content[1]"), RateLimitError("slow down", retry_after_s=7)):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert copy.body() == error.body()
        assert copy.headers() == error.headers()
    assert RateLimitError("x", retry_after_s=7).headers() == {"Retry-After": "7"}


def test_unwrap_finds_the_cause() -> None:
    cause = ImageError("bad")

    class Wrapper(Exception):
        pass

    wrapped = Wrapper("ray")
    wrapped.cause = cause
    assert unwrap(wrapped) is cause
    assert unwrap(ValueError("x")) is None
    assert isinstance(unwrap(cause), APIError)
