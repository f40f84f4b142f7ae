"""What a new user sees on the default config, with no sampling fields set: right answers to the
page's sample images and the README's pictures, and a short honest sentence for what the demo model
was not taught (photos, screenshots, chit-chat), never a loop that runs to max_tokens."""

from __future__ import annotations

import base64
import io
import random

import pytest
from openai import OpenAI
from PIL import Image, ImageDraw

from demo import outside_images
from demo.vqa_data import is_correct, web_samples
from demo.wordings import HONEST_ANSWER
from tests.support.images import MODEL

pytestmark = pytest.mark.integration


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(client: OpenAI, question: str, image: Image.Image | None = None) -> tuple[str, str]:
    """The answer and finish reason, as a client that sets no sampling field gets them."""
    content: list[dict] = [{"type": "text", "text": question}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                            max_tokens=64)
    choice = answer.choices[0]
    return choice.message.content, choice.finish_reason


@pytest.mark.parametrize("sample", web_samples(), ids=lambda s: f"{s.question_type}-{s.lang}")
def test_the_pages_sample_images_get_right_answers(client: OpenAI, sample) -> None:
    answer, finish = ask(client, sample.question, sample.image)
    assert is_correct(answer, sample.answer), (answer, sample.answer)
    assert finish == "stop"


def red_circle() -> Image.Image:
    picture = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(picture).ellipse((48, 48, 208, 208), fill="red")
    return picture


@pytest.mark.parametrize(("question", "image", "expected"), [
    ("What color is this?", Image.new("RGB", (64, 64), "red"), "It is red."),
    ("这是什么颜色？", Image.new("RGB", (64, 64), "red"), "这是红色的。"),
    ("What shape is this?", red_circle(), "It is a circle."),
    ("What color is the shape?", red_circle(), "The circle is red."),
], ids=["red-square", "red-square-zh", "circle-shape", "circle-color"])
def test_simple_pictures_like_the_readmes_get_right_answers(client: OpenAI, question: str, image: Image.Image,
                                                            expected: str) -> None:
    assert ask(client, question, image) == (expected, "stop")


@pytest.mark.parametrize(("question", "image"), [
    ("What is in this picture?", outside_images.landscape(random.Random(12345), (320, 240))),
    ("Describe this photo.", Image.effect_mandelbrot((256, 256), (-2, -1.5, 1, 1.5), 100).convert("RGB")),
    ("What does this screenshot show?", outside_images.screenshot(random.Random(99), (400, 300))),
    ("Hello!", None),
], ids=["landscape", "fractal", "screenshot", "no-image"])
def test_what_it_was_not_taught_gets_the_honest_sentence(client: OpenAI, question: str,
                                                         image: Image.Image | None) -> None:
    assert ask(client, question, image) == (HONEST_ANSWER["en"], "stop")
