"""The default server really sees: held-out accuracy floors through the HTTP API (issue 3).

Runs against the session's `serve run` of serve_config.yaml, which serves the committed trained
checkpoint, with the official `openai` client, base64 PNG images and greedy decoding, exactly as
`vlm-serve eval` does. (The full 500-sample figure is in configs/models/demo-vqa.md.)
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from demo.evaluate import ask, evaluate
from demo.vqa_data import QUESTION_TYPES, generate, is_correct
from tests.support.images import MODEL

N = 200  # 40 per question type: a type at 80% may miss at most 8


def test_held_out_accuracy_through_the_api_meets_the_floors(server) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(f"{server.base_url}/v1", MODEL, N)
    assert set(result["per_type"]) == set(QUESTION_TYPES)
    assert result["overall"] >= 0.90, result["wrong"]
    assert min(result["per_type"].values()) >= 0.80, (result["per_type"], result["wrong"])


def test_greedy_answers_alone_equal_answers_in_a_batch_of_eight(client: OpenAI, server) -> None:  # type: ignore[no-untyped-def]
    samples = generate("test", 8, start=300)
    alone = [ask(client, MODEL, s).prediction for s in samples]
    seen = len(server.log())
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = [p.prediction for p in pool.map(lambda s: ask(client, MODEL, s), samples)]
    assert together == alone
    # The answers were right, not merely equal, and the eight really ran together.
    assert sum(is_correct(p, s.answer) for p, s in zip(alone, samples)) >= 6
    sizes = [int(n) for n in re.findall(r"batch_size=(\d+)", server.log()[seen:])]
    assert sizes and max(sizes) > 1, "the 8 concurrent requests never shared a batch"
