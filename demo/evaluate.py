"""Accuracy of a model on the held-out synthetic VQA split, per question type.

Two ways to ask the questions, scored the same way (exact match after `normalize_answer`):

- `evaluate(base_url, model, n)`: through a running server's `/v1/chat/completions`, with the
  official `openai` client, base64 data-URL images and greedy decoding (temperature 0);
- `evaluate_offline(model, processor, ...)`: the model itself with greedy `model.generate`, for
  measuring a checkpoint right after training.

    python -m demo.evaluate --base-url http://127.0.0.1:8000/v1 --model glm4v-demo-vqa --n 200
    python -m demo.evaluate --offline checkpoints/glm4v-demo-vqa --n 500
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from demo.prompt_format import PromptStyle, build_prompt
from demo.vqa_data import LANGUAGES, QUESTION_TYPES, VQASample, generate, is_correct


@dataclass(frozen=True)
class Prediction:
    """One answered question, enough to score it and to show what went wrong."""

    question_type: str
    lang: str
    question: str
    answer: str
    prediction: str

    @property
    def correct(self) -> bool:
        return is_correct(self.prediction, self.answer)


def score(predictions: Iterable[Prediction], max_wrong: int = 10) -> dict[str, Any]:
    """Overall, per-type and per-language accuracy, plus a few wrong answers to look at."""
    preds = list(predictions)
    by_type: dict[str, list[bool]] = defaultdict(list)
    by_lang: dict[str, list[bool]] = defaultdict(list)
    for p in preds:
        by_type[p.question_type].append(p.correct)
        by_lang[p.lang].append(p.correct)

    def acc(flags: Sequence[bool]) -> float:
        return sum(flags) / len(flags) if flags else 0.0

    order = [t for t in QUESTION_TYPES if t in by_type] + sorted(set(by_type) - set(QUESTION_TYPES))
    return {
        "n": len(preds),
        "correct": sum(p.correct for p in preds),
        "overall": acc([p.correct for p in preds]),
        "per_type": {t: acc(by_type[t]) for t in order},
        "per_type_n": {t: len(by_type[t]) for t in order},
        "per_lang": {lang: acc(by_lang[lang]) for lang in LANGUAGES if lang in by_lang},
        "wrong": [vars(p) for p in preds if not p.correct][:max_wrong],
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per question type, then per language, then overall."""
    rows = [("question type", "n", "accuracy")]
    for qtype, accuracy in result["per_type"].items():
        rows.append((qtype, str(result["per_type_n"][qtype]), f"{accuracy:.1%}"))
    for lang, accuracy in result.get("per_lang", {}).items():
        rows.append((f"language: {lang}", "", f"{accuracy:.1%}"))
    rows.append(("overall", str(result["n"]), f"{result['overall']:.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Through the HTTP API


def image_data_url(image: Image.Image) -> str:
    """The image as a PNG `data:` URL, the way clients send local images to OpenAI's API."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(sample: VQASample) -> list[dict[str, Any]]:
    """One user message: the image, then the question (the layout the demo model saw most)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(sample.image)}},
                {"type": "text", "text": sample.question},
            ],
        }
    ]


def ask(client: Any, model: str, sample: VQASample, max_tokens: int = 24) -> Prediction:
    response = client.chat.completions.create(
        model=model, messages=chat_messages(sample), temperature=0, max_tokens=max_tokens
    )
    text = response.choices[0].message.content or ""
    return Prediction(sample.question_type, sample.lang, sample.question, sample.answer, text)


def evaluate(
    base_url: str,
    model: str,
    n: int,
    api_key: str | None = None,
    *,
    split: str = "test",
    concurrency: int = 8,
    max_tokens: int = 24,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Send `n` samples of `split` through a running server; accuracy per question type."""
    from openai import OpenAI

    # The client insists on a key; a server without auth ignores whatever is sent.
    client = OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout, max_retries=1)
    samples = generate(split, n)
    # Concurrent requests, as real clients send them: they also exercise the server's batching.
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        predictions = list(pool.map(lambda s: ask(client, model, s, max_tokens), samples))
    return score(predictions)


# ----------------------------------------------------------------------------------------------
# Offline, with the model in this process


def generate_answers(
    model: Any, processor: Any, samples: Sequence[VQASample], max_new_tokens: int = 24, image_first: bool = True
) -> list[str]:
    """Greedy answers for a batch of samples, the prompt built exactly as in training/serving."""
    import torch


    style = PromptStyle(image_first=image_first)
    texts = [build_prompt(processor, s.question, style) for s in samples]
    inputs = processor(text=texts, images=[s.image for s in samples], return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)


def evaluate_offline(
    model: Any,
    processor: Any,
    *,
    split: str = "test",
    n: int = 500,
    batch_size: int = 64,
    image_first: bool = True,
) -> dict[str, Any]:
    """Greedy accuracy of `model` on `n` samples of `split`, per question type."""
    predictions: list[Prediction] = []
    samples = generate(split, n)
    for start in range(0, n, batch_size):
        batch = samples[start : start + batch_size]
        answers = generate_answers(model, processor, batch, image_first=image_first)
        predictions += [Prediction(s.question_type, s.lang, s.question, s.answer, a) for s, a in zip(batch, answers)]
    return score(predictions)


def load_checkpoint(path: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """Model and processor from a `save_pretrained` directory, the way the server loads them."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    if device:
        model.to(device)
    return model, processor


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="glm-4v-flash-web", help="the model name the server serves")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--n", type=int, default=200, help="number of held-out samples")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--offline", metavar="CHECKPOINT", help="run this checkpoint in-process instead")
    parser.add_argument("--device", default=None, help="with --offline: cpu, cuda, ...")
    parser.add_argument("--text-first", action="store_true", help="with --offline: question before image")
    parser.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.offline:
        model, processor = load_checkpoint(args.offline, args.device)
        result = evaluate_offline(model, processor, split=args.split, n=args.n, image_first=not args.text_first)
    else:
        result = evaluate(
            args.base_url, args.model, args.n, args.api_key, split=args.split, concurrency=args.concurrency
        )
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `eval` to `vlm-serve`'s subcommands."""
    parser = subparsers.add_parser("eval", help="held-out visual QA accuracy through a running server",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser).set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
