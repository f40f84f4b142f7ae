"""OpenAI request shapes, conversion to prompt messages, and the error body mapping."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from serve_app.errors import (
    APIError,
    ContextLengthError,
    ImageError,
    InvalidRequestError,
    RateLimitError,
    unwrap,
)
from serve_app.openai.conversation import check_prompt_length, sampling_params, split_request, text_chars
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
        ({"n": 0}, "n"),
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


# ---- ranges the engines rely on ------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"seed": 2**63}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop": ["ok", "y" * 10_000]}, "stop"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"temperature": float("nan")}, "temperature"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ],
)
def test_out_of_range_sampling_values_name_the_param(fields: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        request(**fields)
    error = validation_error([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])
    assert (error.status_code, error.param) == (400, param)


def test_values_at_the_edges_of_the_ranges_are_accepted() -> None:
    body = request(seed=2**63 - 1, stop=["z" * 256] * 4, top_k=-1, repetition_penalty=2.0)
    params = sampling_params(body, LIMITS)
    assert params.seed == 2**63 - 1 and params.stop == ("z" * 256,) * 4
    assert params.top_k == 0  # vLLM's -1: off
    assert sampling_params(request(seed=-(2**63)), LIMITS).seed == -(2**63)


@pytest.mark.parametrize("tiny", [1e-45, 5e-324, 9.9e-6])
def test_temperatures_too_small_to_divide_by_are_greedy(tiny: float) -> None:
    assert request(temperature=tiny).temperature == 0.0
    assert sampling_params(request(temperature=tiny), LIMITS).greedy


def test_a_small_but_usable_temperature_is_kept() -> None:
    assert request(temperature=1e-5).temperature == 1e-5


# ---- sampling defaults: the request wins, then the model's, then OpenAI's ------------------------

MODEL_DEFAULTS = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 128}


def test_left_out_fields_take_the_models_defaults() -> None:
    params = sampling_params(request(), LIMITS, MODEL_DEFAULTS)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.0, 0.8, 20, 1.05)
    assert params.max_tokens is None  # the model stage fills it within the context window


def test_fields_the_request_sets_win_over_the_models_defaults() -> None:
    body = request(temperature=0.7, top_p=0.5, top_k=0, repetition_penalty=1.0)
    params = sampling_params(body, LIMITS, MODEL_DEFAULTS)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.5, 0, 1.0)
    # one field set, the others still the model's
    params = sampling_params(request(temperature=1.0), LIMITS, MODEL_DEFAULTS)
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 0.8, 20)


def test_without_model_defaults_openai_defaults_apply() -> None:
    params = sampling_params(request(), LIMITS, {"max_tokens": 64})
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    assert sampling_params(request(), LIMITS) == params


def test_left_out_means_none_on_the_wire_model() -> None:
    body = request()
    assert (body.temperature, body.top_p, body.top_k, body.repetition_penalty) == (None, None, None, None)


# ---- the cheap bound on prompt text ----------------------------------------------------------------


def test_text_beyond_what_the_context_window_can_hold_is_refused_unread() -> None:
    parts = [{"type": "text", "text": "a" * 600}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
             {"type": "text", "text": "b" * 400}]
    body = request(messages=[{"role": "system", "content": "s" * 24}, {"role": "user", "content": parts}])
    assert text_chars(body) == 1024
    check_prompt_length(body, 1024, 16)  # at the bound: the model stage decides
    check_prompt_length(body, None, 16)  # no bound known
    with pytest.raises(ContextLengthError) as info:
        check_prompt_length(body, 1023, 16)
    assert info.value.body().error.model_dump() == {
        "message": info.value.message, "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded",
    }
    assert "16 tokens" in info.value.message
