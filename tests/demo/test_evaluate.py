"""Scoring of the VQA evaluation, and its HTTP client path with the official `openai` package.

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

from demo.evaluate import Prediction, chat_messages, evaluate, format_table, image_data_url, score
from demo.vqa_data import QUESTION_TYPES, generate


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
    table = format_table(result)
    assert "shape" in table and "50.0%" in table and "overall" in table.splitlines()[-1]


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
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        question = next(p["text"] for p in content if p["type"] == "text")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        answer = type(self).answers[(image.tobytes(), question)]
        if len(type(self).requests) % 3 == 0:
            answer = "I do not know."
        reply = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
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
    _AnswerKey.answers = {(s.image.tobytes(), s.question): s.answer for s in generate("test", 15)}
    _AnswerKey.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AnswerKey)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_evaluate_through_the_openai_client(answer_key_server: str) -> None:
    result = evaluate(answer_key_server, "glm4v-demo-vqa", 15, api_key="secret", concurrency=1)
    assert result["n"] == 15
    assert result["correct"] == 10  # every third answer was wrong
    assert set(result["per_type"]) == set(QUESTION_TYPES)
    sent = _AnswerKey.requests[0]
    assert sent["model"] == "glm4v-demo-vqa"
    assert sent["temperature"] == 0 and sent["max_tokens"] <= 32
