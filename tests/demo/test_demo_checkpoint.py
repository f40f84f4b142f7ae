"""The committed demo checkpoint loads like any hub model and really answers visual questions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from demo.evaluate import generate_answers
from demo.vqa_data import generate, is_correct

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "glm4v-demo-vqa"
N = 20
FLOOR = 0.8

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT / "model.safetensors").exists(),
    reason="trained demo checkpoint not present (train with demo/train.py on a GPU)",
)


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    return model, processor


def test_checkpoint_files_and_size() -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    ):
        assert (CHECKPOINT / name).exists(), name
    total = sum(f.stat().st_size for f in CHECKPOINT.iterdir())
    assert total < 20 * 1024 * 1024


def test_loads_as_glm46v(loaded) -> None:  # type: ignore[no-untyped-def]
    model, processor = loaded
    assert model.config.model_type == "glm4v"
    assert type(processor).__name__ == "Glm46VProcessor"


def test_answers_held_out_questions(loaded) -> None:  # type: ignore[no-untyped-def]
    model, processor = loaded
    samples = generate("test", N)
    answers = generate_answers(model, processor, samples)
    right = [is_correct(a, s.answer) for a, s in zip(answers, samples)]
    wrong = [(s.question, s.answer, a) for a, s, ok in zip(answers, samples, right) if not ok]
    assert sum(right) / N >= FLOOR, wrong


def test_greedy_answer_is_the_same_alone_or_in_a_batch(loaded) -> None:  # type: ignore[no-untyped-def]
    model, processor = loaded
    samples = generate("test", 8, start=100)
    batched = generate_answers(model, processor, samples)
    alone = [generate_answers(model, processor, [s])[0] for s in samples]
    assert batched == alone
