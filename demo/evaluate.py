"""Accuracy of a model on the held-out synthetic VQA split, per question type.

Two ways to ask the questions, scored the same way (exact match after `normalize_answer`):

- `evaluate(base_url, model, n)`: through a running server's `/v1/chat/completions`, with the
  official `openai` client, base64 data-URL images and greedy decoding (temperature 0);
- `evaluate_offline(model, processor, ...)`: the model itself with greedy `model.generate`, for
  measuring a checkpoint right after training.

The core rows (the five question types in their base wordings on the test split) are the figures
earlier evaluations reported. With `extra` > 0 the result has further rows of `extra` samples each
(`vqa_data.evaluation_set`): the core questions in held-out wordings, full-canvas colors, one-shape
scenes, and the out-of-world kinds whose right answer is the honest sentence, each kind split into
training and held-out wordings. Every result counts the answers that ran to `max_tokens`
(finish reason `length`) instead of ending: a model that loops shows there.

    python -m demo.evaluate --base-url http://127.0.0.1:8000/v1 --model glm4v-demo-vqa --n 200
    python -m demo.evaluate --offline checkpoints/glm4v-demo-vqa --n 500 --extra 100
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
from demo.vqa_data import (
    EXTRA_TYPES,
    LANGUAGES,
    OUT_OF_WORLD_TYPES,
    PARAPHRASE_ROW,
    QUESTION_TYPES,
    VQASample,
    evaluation_set,
    is_correct,
)

# Room for the longest answer of the set (the Chinese honest sentence, about 40 tokens with this
# tokenizer) and its end token; an answer still going at this length is a loop.
MAX_TOKENS = 64
HELD_OUT_SUFFIX = "/held_out"
ROW_LABELS: dict[str, str] = {
    PARAPHRASE_ROW: "core questions, paraphrased",
    "canvas": "full-canvas color",
    "scene": "one-shape scene",
    "photo": "photo-like: honest answer",
    "screenshot": "screenshot-like: honest answer",
    "no_image": "no image: honest answer",
    "off_topic": "off-topic question: honest answer",
}


@dataclass(frozen=True)
class Prediction:
    """One answered question, enough to score it and to show what went wrong."""

    question_type: str
    lang: str
    question: str
    answer: str
    prediction: str
    wording: str = "base"
    # "stop" (the answer ended) or "length" (it ran to max_tokens), as OpenAI's API says.
    finish_reason: str = "stop"

    @property
    def correct(self) -> bool:
        return is_correct(self.prediction, self.answer)

    @property
    def row(self) -> str | None:
        """The extra row this prediction belongs to; None for the core rows."""
        if self.question_type in QUESTION_TYPES:
            if self.wording == "base":
                return None
            group = PARAPHRASE_ROW
        else:
            group = self.question_type
        return group + (HELD_OUT_SUFFIX if self.wording == "held_out" else "")

    @classmethod
    def of(cls, sample: VQASample, prediction: str, finish_reason: str = "stop") -> Prediction:
        return cls(
            sample.question_type, sample.lang, sample.question, sample.answer, prediction, sample.wording, finish_reason
        )


def _acc(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _summary(preds: Sequence[Prediction]) -> dict[str, Any]:
    return {"n": len(preds), "correct": sum(p.correct for p in preds), "accuracy": _acc([p.correct for p in preds])}


def row_order() -> list[str]:
    return [group + suffix for group in (PARAPHRASE_ROW, *EXTRA_TYPES) for suffix in ("", HELD_OUT_SUFFIX)]


def row_label(row: str) -> str:
    group, held, _ = row.partition(HELD_OUT_SUFFIX)
    return ROW_LABELS[group] + (", held-out wording" if held else "")


def score(predictions: Iterable[Prediction], max_wrong: int = 10) -> dict[str, Any]:
    """Core accuracy (overall, per type, per language), the extra rows, and answers cut off.

    `overall`, `per_type` and `per_lang` cover the core rows only, so they compare with earlier
    evaluations; `selection` (what training keeps its best weights by) averages the core accuracy
    with the extra rows' when there are any.
    """
    preds = list(predictions)
    core = [p for p in preds if p.row is None]
    extra = [p for p in preds if p.row is not None]
    by_type: dict[str, list[bool]] = defaultdict(list)
    by_lang: dict[str, list[bool]] = defaultdict(list)
    by_row: dict[str, list[Prediction]] = defaultdict(list)
    for p in core:
        by_type[p.question_type].append(p.correct)
        by_lang[p.lang].append(p.correct)
    for p in extra:
        by_row[p.row or ""].append(p)

    order = [t for t in QUESTION_TYPES if t in by_type]
    overall = _acc([p.correct for p in core])
    cut = [p for p in preds if p.finish_reason == "length"]
    return {
        "n": len(core),
        "correct": sum(p.correct for p in core),
        "overall": overall,
        "per_type": {t: _acc(by_type[t]) for t in order},
        "per_type_n": {t: len(by_type[t]) for t in order},
        "per_lang": {lang: _acc(by_lang[lang]) for lang in LANGUAGES if lang in by_lang},
        "wrong": [vars(p) for p in core if not p.correct][:max_wrong],
        "extras": {row: _summary(by_row[row]) for row in row_order() if row in by_row},
        "held_out_wordings": _summary([p for p in preds if p.wording == "held_out"]),
        "out_of_world": _summary([p for p in preds if p.question_type in OUT_OF_WORLD_TYPES]),
        "wrong_extras": [vars(p) for p in extra if not p.correct][:max_wrong],
        "answered": len(preds),
        "ran_to_max_tokens": len(cut),
        "ran_to_max_tokens_examples": [vars(p) for p in cut][:max_wrong],
        "selection": (overall + _acc([p.correct for p in extra])) / 2 if extra else overall,
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: the core rows and overall, then the extra rows, then answers cut off."""
    rows: list[tuple[str, str, str] | None] = [("question type", "n", "accuracy"), None]
    for qtype, accuracy in result["per_type"].items():
        rows.append((qtype, str(result["per_type_n"][qtype]), f"{accuracy:.1%}"))
    for lang, accuracy in result.get("per_lang", {}).items():
        rows.append((f"language: {lang}", "", f"{accuracy:.1%}"))
    rows += [None, ("overall", str(result["n"]), f"{result['overall']:.1%}"), None]
    extras = result.get("extras") or {}
    for row, summary in extras.items():
        rows.append((row_label(row), str(summary["n"]), f"{summary['accuracy']:.1%}"))
    for key, label in (("held_out_wordings", "all held-out wordings"), ("out_of_world", "all honest answers")):
        if extras and result[key]["n"]:
            rows.append((label, str(result[key]["n"]), f"{result[key]['accuracy']:.1%}"))
    if extras:
        rows.append(None)
    cut = result.get("ran_to_max_tokens", 0)
    rows.append(("ran to max_tokens", str(cut), f"of {result.get('answered', result['n'])}"))
    real = [r for r in rows if r is not None]
    widths = [max(len(r[i]) for r in real) for i in range(3)]
    line = "-" * (sum(widths) + 4)
    return "\n".join(
        line if r is None else f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows
    )


# ----------------------------------------------------------------------------------------------
# Through the HTTP API


def image_data_url(image: Image.Image) -> str:
    """The image as a PNG `data:` URL, the way clients send local images to OpenAI's API."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(sample: VQASample) -> list[dict[str, Any]]:
    """One user message: the image, then the question (the layout the demo model saw most).

    A sample without an image is sent as plain text content, as text-only clients send it.
    """
    if sample.image is None:
        return [{"role": "user", "content": sample.question}]
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(sample.image)}},
                {"type": "text", "text": sample.question},
            ],
        }
    ]


def ask(client: Any, model: str, sample: VQASample, max_tokens: int = MAX_TOKENS) -> Prediction:
    response = client.chat.completions.create(
        model=model, messages=chat_messages(sample), temperature=0, max_tokens=max_tokens
    )
    choice = response.choices[0]
    return Prediction.of(sample, choice.message.content or "", choice.finish_reason or "stop")


def evaluate(
    base_url: str,
    model: str,
    n: int,
    api_key: str | None = None,
    *,
    split: str = "test",
    concurrency: int = 8,
    max_tokens: int = MAX_TOKENS,
    timeout: float = 120.0,
    extra: int = 0,
) -> dict[str, Any]:
    """Send `n` core samples of `split` (and `extra` per extra row) through a running server."""
    from openai import OpenAI

    # The client insists on a key; a server without auth ignores whatever is sent.
    client = OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout, max_retries=1)
    samples = evaluation_set(split, n, extra)
    # Concurrent requests, as real clients send them: they also exercise the server's batching.
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        predictions = list(pool.map(lambda s: ask(client, model, s, max_tokens), samples))
    return score(predictions)


# ----------------------------------------------------------------------------------------------
# Offline, with the model in this process


def generate_replies(
    model: Any,
    processor: Any,
    samples: Sequence[VQASample],
    max_new_tokens: int = MAX_TOKENS,
    image_first: bool = True,
) -> list[tuple[str, str]]:
    """Greedy (answer, finish reason) for a batch of samples, prompts built as in training/serving.

    The finish reason is "length" when an answer has no end token within `max_new_tokens`.
    """
    import torch

    style = PromptStyle(image_first=image_first)
    texts = [build_prompt(processor, s.question, style, image=s.image is not None) for s in samples]
    images = [s.image for s in samples if s.image is not None]
    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=new_tokens.device)
    ended = torch.isin(new_tokens, eos_ids).any(dim=1).tolist()
    answers = processor.batch_decode(new_tokens, skip_special_tokens=True)
    return [(a, "stop" if done else "length") for a, done in zip(answers, ended)]


def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[VQASample],
    max_new_tokens: int = MAX_TOKENS,
    image_first: bool = True,
) -> list[str]:
    """Greedy answers for a batch of samples (see `generate_replies`)."""
    return [a for a, _ in generate_replies(model, processor, samples, max_new_tokens, image_first)]


def evaluate_offline(
    model: Any,
    processor: Any,
    *,
    split: str = "test",
    n: int = 500,
    batch_size: int = 64,
    image_first: bool = True,
    extra: int = 0,
    held_out: bool = True,
    max_new_tokens: int = MAX_TOKENS,
) -> dict[str, Any]:
    """Greedy accuracy of `model` on `n` core samples of `split` and `extra` per extra row.

    `held_out=False` asks the extra rows in training wordings only (training's own evaluations).
    """
    predictions: list[Prediction] = []
    samples = evaluation_set(split, n, extra, held_out=held_out)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        replies = generate_replies(model, processor, batch, max_new_tokens, image_first)
        predictions += [Prediction.of(s, answer, reason) for s, (answer, reason) in zip(batch, replies)]
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
    parser.add_argument("--n", type=int, default=200, help="number of held-out samples of the core types")
    parser.add_argument(
        "--extra",
        type=int,
        default=None,
        help="samples per extra row (held-out paraphrases, canvas, scene, out-of-world kinds); default N/5, 0: none",
    )
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="answers reaching it count as cut off")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--offline", metavar="CHECKPOINT", help="run this checkpoint in-process instead")
    parser.add_argument("--device", default=None, help="with --offline: cpu, cuda, ...")
    parser.add_argument("--text-first", action="store_true", help="with --offline: question before image")
    parser.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    extra = args.n // 5 if args.extra is None else args.extra
    if args.offline:
        model, processor = load_checkpoint(args.offline, args.device)
        result = evaluate_offline(
            model,
            processor,
            split=args.split,
            n=args.n,
            image_first=not args.text_first,
            extra=extra,
            max_new_tokens=args.max_tokens,
        )
    else:
        result = evaluate(
            args.base_url,
            args.model,
            args.n,
            args.api_key,
            split=args.split,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            extra=extra,
        )
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `eval` to `vlm-serve`'s subcommands."""
    parser = subparsers.add_parser(
        "eval",
        help="held-out visual QA accuracy through a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser).set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
