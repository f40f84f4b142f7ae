"""The application as a user meets it: `serve run serve_config.yaml` and the official openai client."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.images import MODEL, ImageServer, data_url, png_bytes

pytestmark = pytest.mark.integration


def ask(client: OpenAI, content, **kwargs):
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL, messages=messages, **{"max_tokens": 8, **kwargs})


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_models_lists_the_model_and_its_aliases(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "glm-4.6v-flash-demo"
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL


def test_text_only(client: OpenAI) -> None:
    reply = ask(client, "Hello! Who are you?", max_tokens=5)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 1 <= reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_one_base64_image_counts_image_tokens(client: OpenAI) -> None:
    text_only = ask(client, [{"type": "text", "text": "What shape is this?"}], temperature=0)
    with_image = ask(
        client, [{"type": "text", "text": "What shape is this?"}, image_part(data_url(png_bytes((224, 224))))], temperature=0
    )
    # A 224x224 image is 16x16 patches, merged 2x2 into 64 image tokens, plus begin/end markers.
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 64 + 2
    assert with_image.choices[0].message.content


def test_http_image_from_a_local_server(client: OpenAI, image_server: ImageServer) -> None:
    image_server.files["/red.jpg"] = (png_bytes((120, 90), fmt="JPEG"), "image/jpeg")
    reply = ask(client, [{"type": "text", "text": "What color?"}, image_part(image_server.url("/red.jpg"))])
    assert reply.usage.prompt_tokens > 20


def test_two_images_in_one_message(client: OpenAI) -> None:
    one = ask(client, [image_part(data_url(png_bytes((224, 224)))), {"type": "text", "text": "Compare."}])
    two = ask(
        client,
        [image_part(data_url(png_bytes((224, 224)))), image_part(data_url(png_bytes((224, 224), (0, 0, 255)))),
         {"type": "text", "text": "Compare."}],
    )
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == 64 + 2


def test_multi_turn_with_an_image_in_an_earlier_turn(client: OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [image_part(data_url(png_bytes())), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red rectangle."},
        {"role": "user", "content": "And what color is it?"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert reply.choices[0].message.content is not None
    assert reply.usage.prompt_tokens > 20


def test_streaming_with_usage(client: OpenAI) -> None:
    content = [{"type": "text", "text": "Describe."}, image_part(data_url(png_bytes()))]
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = ask(client, content, max_tokens=12, temperature=0)
    assert text == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_max_tokens_gives_length_and_stop_gives_stop(client: OpenAI) -> None:
    long = ask(client, "Count.", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length"
    assert long.usage.completion_tokens == 6
    text = long.choices[0].message.content
    stop = text.strip()[:1]
    if stop:
        stopped = ask(client, "Count.", max_tokens=6, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
        assert stopped.choices[0].finish_reason == "stop"
        assert stop not in stopped.choices[0].message.content


def test_seed_makes_sampling_repeatable(client: OpenAI) -> None:
    runs = [ask(client, "Say something.", max_tokens=8, temperature=1.0, seed=1234).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]


def test_concurrent_requests_are_batched_and_greedy_answers_match_alone(client: OpenAI, server) -> None:
    images = [data_url(png_bytes((40 + 23 * i, 60 + 11 * i), (i * 15, 100, 200 - i * 10))) for i in range(16)]
    contents = [[{"type": "text", "text": f"What is in picture {i}?"}, image_part(url)] for i, url in enumerate(images)]
    alone = [ask(client, c, max_tokens=10, temperature=0).choices[0].message.content for c in contents[:4]]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda c: ask(client, c, max_tokens=10, temperature=0), contents))
    assert all(r.choices[0].message.content is not None for r in together)
    assert [r.choices[0].message.content for r in together[:4]] == alone
    sizes = [int(n) for n in re.findall(r"batch_size=(\d+)", server.log())]
    assert max(sizes) > 1, "16 concurrent requests never shared a batch"


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4-vision-preview", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"


def test_bad_image_names_the_part(client: OpenAI) -> None:
    content = [{"type": "text", "text": "hi"}, image_part("data:image/png;base64,bm90IGFuIGltYWdl")]
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, content)
    assert info.value.body["param"] == "messages[0].content[1]"
    assert info.value.body["type"] == "invalid_request_error"
    assert ask(client, "still there?").choices[0].message.content is not None


def test_prompt_over_the_context_window_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, "hello " * 5000, max_tokens=10)
    assert info.value.body["code"] == "context_length_exceeded"


def test_malformed_json_is_400(server) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
