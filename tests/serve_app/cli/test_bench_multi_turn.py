"""`vlm-serve bench --multi-turn`: conversations that resend everything with each answer, figures per
turn, and the uncached baseline of fresh salts. The client runs against the shipped OpenAI app in
process, over a canned model stage (tests/serve_app/openai/test_chat_api.py); against the real server:
tests/integration/test_prefix_cache.py."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from serve_app.cli import bench
from serve_app.openai.protocol import ChatCompletionRequest
from serve_app.stage_types import GenerationChunk
from tests.serve_app.openai.test_chat_api import sdk


def arguments(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--multi-turn", "--turns", "3", "--num-requests", "2", "--concurrency", "2",
                              "--turn-tokens", "20", "--output-tokens", "4", "--image-size", "16x16", "--warmup", "0",
                              "--no-progress", *extra])


def model_stage(body: ChatCompletionRequest) -> list[GenerationChunk]:
    """An answer naming the turn; 10 prompt tokens a message, all but the last one's cached (none with a salt)."""
    messages = len(body.messages)
    cached = 0 if body.cache_salt else 10 * (messages - 1)
    return [GenerationChunk(f"Answer {messages // 2 + 1}.", 10 * messages, 4, "length", cached_tokens=cached)]


def test_each_turn_resends_the_conversation_with_its_answers_and_is_reported_per_turn(capsys) -> None:
    client, service = sdk(model_stage)
    report = asyncio.run(bench._bench_conversations(client, arguments("--uncached-baseline"), "m"))
    summary = report["summary"]
    assert (summary["successes"], summary["failures"]) == (6, 0)
    assert [t["turn"] for t in summary["turns"]] == [1, 2, 3]
    assert [t["prefix_hit_rate"] for t in summary["turns"]] == [0.0, pytest.approx(20 / 30), pytest.approx(40 / 50)]
    assert [t["prompt_tokens_mean"] for t in summary["turns"]] == [10, 30, 50]
    assert all(t["ttft_p50_s"] > 0 for t in summary["turns"])
    assert [t["prefix_hit_rate"] for t in summary["uncached"]["turns"]] == [0.0, 0.0, 0.0]
    cached_run, baseline = service.bodies[:6], service.bodies[6:]
    third_turns = [b for b in cached_run if len(b.messages) == 5]
    assert len(third_turns) == 2
    for body in third_turns:
        roles = [m.role for m in body.messages]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        assert [m.content for m in body.messages[1::2]] == ["Answer 1.", "Answer 2."]
        first = body.messages[0].content
        assert [p.type for p in first] == ["image_url", "text"] and "turn 1:" in first[1].text
        assert "turn 3:" in body.messages[4].content and body.cache_salt is None
    # The baseline: the same conversations, every request salted apart.
    assert sorted(b.messages[0].content[1].text for b in baseline if len(b.messages) == 1) == sorted(
        b.messages[0].content[1].text for b in cached_run if len(b.messages) == 1)
    assert len({b.cache_salt for b in baseline}) == 6 and None not in {b.cache_salt for b in baseline}
    bench._print_conversations(report)
    printed = capsys.readouterr().out
    assert "2 conversations of 3 turns" in printed and "hit rate" in printed and "uncached (ms)" in printed


def test_turn_texts_are_about_the_asked_length_and_never_repeat() -> None:
    texts = {bench.turn_text(0, c, t, 300) for c in range(3) for t in range(6)}
    assert len(texts) == 18 and bench.turn_text(0, 1, 2, 300) in texts
    assert all(280 <= len(text.split()) <= 310 for text in texts)


def test_per_turn_figures_and_a_server_that_reports_no_cached_tokens() -> None:
    results = [bench.RequestResult(index=i, ok=True, ttft=0.1 * (i + 1), prompt_tokens=100, cached_tokens=None,
                                   turn=i % 2) for i in range(4)]
    turns = bench.per_turn(results)
    assert [(t["turn"], t["requests"], t["prefix_hit_rate"]) for t in turns] == [(1, 2, None), (2, 2, None)]
    assert turns[0]["ttft_p50_s"] == pytest.approx(0.2) and turns[1]["ttft_p50_s"] == pytest.approx(0.3)
    table = bench.format_turns(turns, [{**t, "ttft_p50_s": 2 * t["ttft_p50_s"]} for t in turns])
    assert table.splitlines()[1].split()[-1] == "0.50" and "-" in table.splitlines()[1].split()
