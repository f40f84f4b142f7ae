"""Scoring of the VQA evaluation, its HTTP client path with the official `openai` package, and
the offline path's finish reasons.

The HTTP test runs `evaluate()` against a small local endpoint that speaks OpenAI's chat
completions wire format and decodes the sent image with Pillow; it checks the client side (what
is sent, how answers are scored), not our server, which has its own integration tests.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from PIL import Image

from demo.evaluate import (
    Prediction,
    chat_messages,
    evaluate,
    format_table,
    generate_replies,
    image_data_url,
    score,
)
from demo.vqa_data import EXTRA_TYPES, QUESTION_TYPES, evaluation_set, generate, make_extra_sample
from demo.wordings import HONEST_ANSWER


def test_score_counts_per_type_and_language() -> None:
    preds = [
        Prediction("shape", "en", "q", "It is a star.", "it is a star"),
        Prediction("shape", "zh", "q", "这是星形。", "这是圆形。"),
        Prediction("count", "en", "q", "There are two circles.", " There are two circles. "),
        Prediction("text", "zh", "q", "写的是CAT。", "写的是cat"),
    ]
    result = score(preds)
    assert result["n"] == 4 and result["correct"] == 3
    assert result["overall"] == pytest.approx(0.75)
    assert result["per_type"] == {"shape": 0.5, "count": 1.0, "text": 1.0}
    assert result["per_lang"] == {"en": 1.0, "zh": 0.5}
    assert [w["prediction"] for w in result["wrong"]] == ["这是圆形。"]
    assert result["extras"] == {} and result["selection"] == result["overall"]
    assert result["ran_to_max_tokens"] == 0 and result["answered"] == 4
    table = format_table(result).splitlines()
    assert "shape" in table[2] and "50.0%" in table[2]
    assert table[-3].startswith("overall") and table[-3].endswith("75.0%")
    assert table[-1].split() == ["ran", "to", "max_tokens", "0", "of", "4"]


def test_score_reports_paraphrases_and_out_of_world_rows_apart_from_the_core() -> None:
    honest = HONEST_ANSWER["en"]
    preds = [
        Prediction("shape", "en", "What shape is this?", "It is a star.", "It is a star."),
        Prediction("shape", "en", "What shape is drawn here?", "It is a star.", "It is a circle.", "held_out"),
        Prediction("color", "en", "What colour is the star?", "The star is red.", "The star is red.", "paraphrase"),
        Prediction("canvas", "en", "What color is this?", "It is red.", "It is red."),
        Prediction("canvas", "zh", "整张图是什么颜色?", "这是红色的。", "这是红色的。", "held_out"),
        Prediction("photo", "en", "Describe this image.", honest, honest),
        Prediction("no_image", "en", "Hello!", honest, "TheThereThere", "base", "length"),
    ]
    result = score(preds)
    # The core figures are the base wordings of the core types only, as earlier evaluations.
    assert (result["n"], result["overall"], result["per_type"]) == (1, 1.0, {"shape": 1.0})
    assert {row: (r["n"], r["accuracy"]) for row, r in result["extras"].items()} == {
        "paraphrase": (1, 1.0),
        "paraphrase/held_out": (1, 0.0),
        "canvas": (1, 1.0),
        "canvas/held_out": (1, 1.0),
        "photo": (1, 1.0),
        "no_image": (1, 0.0),
    }
    assert (result["held_out_wordings"]["n"], result["held_out_wordings"]["accuracy"]) == (2, 0.5)
    assert (result["out_of_world"]["n"], result["out_of_world"]["accuracy"]) == (2, 0.5)
    assert result["ran_to_max_tokens"] == 1 and result["answered"] == 7
    assert result["ran_to_max_tokens_examples"][0]["question"] == "Hello!"
    assert result["selection"] == pytest.approx((1.0 + 4 / 6) / 2)
    table = format_table(result)
    assert "core questions, paraphrased, held-out wording" in table
    assert "no image: honest answer" in table and "full-canvas color, held-out wording" in table
    assert table.splitlines()[-1].split()[-3:] == ["1", "of", "7"]


def test_image_data_url_round_trips_through_pillow() -> None:
    sample = generate("test", 1)[0]
    url = image_data_url(sample.image)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.tobytes() == sample.image.tobytes()
    message = chat_messages(sample)[0]
    assert [part["type"] for part in message["content"]] == ["image_url", "text"]


class _AnswerKey(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions from an answer key, keyed by (image bytes, question).

    Every third answer is wrong on purpose, so the test sees the scoring count mistakes.
    """

    answers: ClassVar[dict[tuple[bytes, str], str]] = {}
    requests: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        content = body["messages"][0]["content"]
        if isinstance(content, str):  # a text-only request
            pixels, question = b"", content
        else:
            url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
            question = next(p["text"] for p in content if p["type"] == "text")
            pixels = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB").tobytes()
        answer, finish = type(self).answers[(pixels, question)], "stop"
        if len(type(self).requests) % 3 == 0:
            answer = "I do not know."
        if len(type(self).requests) % 7 == 0:
            answer, finish = "There There There", "length"
        reply = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answer_key_server() -> Iterator[str]:
    _AnswerKey.answers = {
        (s.image.tobytes() if s.image else b"", s.question): s.answer for s in evaluation_set("test", 15, 2)
    }
    _AnswerKey.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AnswerKey)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_evaluate_through_the_openai_client(answer_key_server: str) -> None:
    result = evaluate(answer_key_server, "glm4v-demo-vqa", 15, api_key="secret", concurrency=1)
    assert result["n"] == 15 and result["answered"] == 15
    # Every third answer was wrong (5), and the 7th and 14th were cut off mid-loop (2 more).
    assert result["correct"] == 8
    assert result["ran_to_max_tokens"] == 2
    assert set(result["per_type"]) == set(QUESTION_TYPES)
    sent = _AnswerKey.requests[0]
    assert sent["model"] == "glm4v-demo-vqa"
    # Greedy, with room for the longest answer of the set, and a limit a loop reaches.
    assert sent["temperature"] == 0 and 48 <= sent["max_tokens"] <= 128


def test_evaluate_sends_the_extra_rows_and_text_only_requests(answer_key_server: str) -> None:
    result = evaluate(answer_key_server, "glm4v-demo-vqa", 5, concurrency=1, extra=2)
    assert result["answered"] == 5 + 2 * (1 + len(EXTRA_TYPES))
    assert set(result["extras"]) == {"paraphrase/held_out"} | {t for t in EXTRA_TYPES} | {
        f"{t}/held_out" for t in EXTRA_TYPES
    }
    text_only = [r for r in _AnswerKey.requests if isinstance(r["messages"][0]["content"], str)]
    assert len(text_only) == 2  # the no-image row, sent as plain text content
    assert (
        chat_messages(make_extra_sample(0, 0, "no_image"))[0]["content"] == make_extra_sample(0, 0, "no_image").question
    )


def test_offline_replies_say_whether_the_answer_ended() -> None:
    import torch

    from demo.model import build_config, build_model, build_processor, build_tokenizer

    processor = build_processor(build_tokenizer())
    model = build_model(build_config(processor.tokenizer), seed=0).eval()
    samples = [generate("test", 1)[0], make_extra_sample(0, 0, "no_image"), make_extra_sample(0, 1, "canvas")]
    # An end token the untrained model never produces: every answer runs to the limit.
    model.generation_config.eos_token_id = [processor.tokenizer.convert_tokens_to_ids("<|video|>")]
    replies = generate_replies(model, processor, samples, max_new_tokens=4)
    assert [reason for _, reason in replies] == ["length"] * 3
    # The token greedy decoding picks first, made the end token: the answer ends at once.
    from demo.prompt_format import build_prompt

    inputs = processor(
        text=[build_prompt(processor, samples[0].question)], images=[samples[0].image], return_tensors="pt"
    )
    with torch.no_grad():
        first = int(model(**inputs).logits[0, -1].argmax())
    model.generation_config.eos_token_id = [first]
    assert [reason for _, reason in generate_replies(model, processor, samples[:1], max_new_tokens=4)] == ["stop"]
