"""What prefix caching shows of itself on the OpenAI surface: `usage.prompt_tokens_details.cached_tokens`
from the model stage's chunks (whole and streamed, read by the `openai` SDK's types), and the
`cache_salt` request field, bounded, reaching the service."""

from __future__ import annotations

from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk

from serve_app.openai.choices import OutputOptions
from serve_app.stage_types import GenerationChunk
from tests.serve_app.openai.test_chat_api import client, post
from tests.serve_app.openai.test_choices import streamed, whole


def answer(cached: int) -> list[GenerationChunk]:
    return [GenerationChunk("A red ", 40, 2, image_tokens=16, cached_tokens=cached),
            GenerationChunk("circle.", 40, 3, "stop", image_tokens=16, cached_tokens=cached)]


def test_cached_tokens_reach_the_usage_whole_and_streamed() -> None:
    body = whole(answer(32), OutputOptions())
    details = SDKChatCompletion.model_validate(body).usage.prompt_tokens_details
    assert (details.cached_tokens, body["usage"]["prompt_tokens_details"]["image_tokens"]) == (32, 16)
    last = SDKChatCompletionChunk.model_validate(streamed(answer(32), OutputOptions())[-1])
    assert last.usage.prompt_tokens_details.cached_tokens == 32 and last.usage.prompt_tokens == 40
    assert whole(answer(0), OutputOptions())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_cache_salt_reaches_the_service_and_is_bounded() -> None:
    c, service = client()
    assert post(c, cache_salt="tenant-7").status_code == 200
    assert service.bodies[-1].cache_salt == "tenant-7"
    assert post(c).status_code == 200 and service.bodies[-1].cache_salt is None
    for bad in ("", "x" * 257, 7):
        response = post(c, cache_salt=bad)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "cache_salt"
    assert post(c, cache_salt="x" * 256).status_code == 200
