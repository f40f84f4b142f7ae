"""Per-request resolution (`detail`, min/max pixels), image-aware admission control, image cache."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from deployments.admission import AdmissionBudget, Cost
from serve_app.errors import InvalidRequestError, ServiceUnavailableError
from tests.support.images import MODEL, data_url, png_bytes
from tests.support.serving import ServeProcess, config_for_tests, free_port, start_server


def image_request(client: OpenAI, url: str, **image_fields):
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url, **image_fields}}]
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=3)


@pytest.mark.integration
def test_detail_sets_the_resolution_and_usage_shows_image_tokens(client: OpenAI) -> None:
    big = data_url(png_bytes((800, 800)))
    tokens = {d: image_request(client, big, detail=d).usage.prompt_tokens_details.image_tokens
              for d in ("low", "high", "auto")}
    # The demo model: 'high' is its processor's 224x224 (16x16 patches -> 64 tokens), 'low' 112x112.
    assert tokens == {"low": 16, "high": 64, "auto": 64}
    small = data_url(png_bytes((56, 56)))
    assert image_request(client, small, detail="high").usage.prompt_tokens_details.image_tokens == 4


@pytest.mark.integration
def test_pixel_bounds_extension_is_validated_against_the_server_limits(client: OpenAI) -> None:
    big = data_url(png_bytes((800, 800)))
    reply = image_request(client, big, max_pixels=112 * 112)
    assert reply.usage.prompt_tokens_details.image_tokens == 16
    with pytest.raises(openai.BadRequestError) as info:
        image_request(client, big, max_pixels=4096 * 4096)
    assert info.value.body["param"] == "messages[0].content[1].image_url.max_pixels"
    with pytest.raises(openai.BadRequestError) as info:
        image_request(client, big, min_pixels=5000, max_pixels=4000)
    assert info.value.body["param"].startswith("messages[0].content[1].image_url")


@pytest.mark.integration
def test_max_completion_tokens_is_openais_newer_name(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count."}], max_completion_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"


# ---- admission control ---------------------------------------------------------------------------

BUDGET = 400  # tokens in flight: two requests of one 224x224 image (~90 prompt tokens) + 100 new tokens


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    config = config_for_tests(free_port(), deployments={"VLMServer": {"user_config": {
        "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "token_budget": BUDGET, "admission_timeout_s": 1.0}}})
    server = start_server(tmp_path_factory.mktemp("budgeted"), config)
    yield server
    server.stop()


def chat(server: ServeProcess, max_tokens: int) -> httpx.Response:
    content = [{"type": "text", "text": "Describe."},
               {"type": "image_url", "image_url": {"url": data_url(png_bytes((640, 480))), "detail": "high"}}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)


@pytest.mark.integration
def test_a_request_that_can_never_fit_is_refused_naming_the_limit(budgeted: ServeProcess) -> None:
    response = chat(budgeted, max_tokens=BUDGET)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "request_too_large_for_model" and str(BUDGET) in error["message"]


@pytest.mark.integration
def test_a_burst_of_large_images_gets_only_answers_and_clean_refusals(budgeted: ServeProcess) -> None:
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: chat(budgeted, max_tokens=100), range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2
    for refused in (r for r in responses if r.status_code == 503):
        assert refused.json()["error"]["code"] == "model_at_capacity"
        assert int(refused.headers["Retry-After"]) >= 1
    assert chat(budgeted, max_tokens=10).status_code == 200
    # One VLMServer process served everything: the replica never died or restarted.
    pids = set(re.findall(r"ServeReplica:vlm:VLMServer pid=(\d+)", budgeted.log()))
    assert len(pids) == 1, pids


def test_budget_waits_for_room_then_refuses() -> None:
    async def scenario() -> None:
        budget = AdmissionBudget(max_tokens=100, max_images=2)
        with pytest.raises(InvalidRequestError):
            budget.check_possible(Cost(tokens=101, images=0))
        with pytest.raises(InvalidRequestError):
            budget.check_possible(Cost(tokens=1, images=3))
        await budget.acquire(Cost(60, 1), timeout_s=0.1)
        with pytest.raises(ServiceUnavailableError):
            await budget.acquire(Cost(60, 1), timeout_s=0.1)
        waiter = asyncio.create_task(budget.acquire(Cost(60, 1), timeout_s=2))
        await asyncio.sleep(0.05)
        await budget.release(Cost(60, 1))
        await waiter
        assert (budget.tokens_in_use, budget.images_in_use) == (60, 1)

    asyncio.run(scenario())


# ---- the content-hash cache ------------------------------------------------------------------


def test_an_image_seen_again_is_not_processed_again(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from demo.model import make_demo_model
    from deployments.preprocess import ImagePreprocessor
    from serve_app.settings import ImageSettings, ModelSettings
    from serve_app.stage_types import ImageInput

    path = make_demo_model(tmp_path / "demo")
    settings = ImageSettings(detail_low_max_pixels=112 * 112)
    pre = ImagePreprocessor.func_or_class(settings, ModelSettings(id="d", path=str(path)))
    calls = []
    real = pre._to_tensors
    monkeypatch.setattr(pre, "_to_tensors", lambda *a: calls.append(1) or real(*a))
    url = data_url(png_bytes((300, 200)))

    async def run():
        first = await pre.process(ImageInput(url, "p"))
        again = await pre.process(ImageInput(url, "q"))
        low = await pre.process(ImageInput(url, "r", detail="low"))
        return first, again, low

    first, again, low = asyncio.run(run())
    assert again is first and len(calls) == 2  # the 'low' variant is a different budget
    assert low.tokens < first.tokens


def test_pixels_leave_in_the_dtype_the_model_yaml_names(tmp_path) -> None:
    """bf16 for a bf16 model (half the bytes over Ray; the model casts to it anyway), float32 for "auto"."""
    import torch

    from demo.model import make_demo_model
    from deployments.preprocess import ImagePreprocessor
    from serve_app.settings import ImageSettings, ModelSettings
    from serve_app.stage_types import ImageInput

    path = make_demo_model(tmp_path / "demo")
    url = data_url(png_bytes((300, 200)))
    made = {}
    for dtype in ("auto", "bfloat16"):
        pre = ImagePreprocessor.func_or_class(ImageSettings(), ModelSettings(id="d", path=str(path), dtype=dtype))
        made[dtype] = asyncio.run(pre.process(ImageInput(url, "p"))).pixel_values
    assert made["auto"].dtype == torch.float32 and made["bfloat16"].dtype == torch.bfloat16
    assert torch.equal(made["auto"].to(torch.bfloat16), made["bfloat16"])
