"""The continuous engine's scheduler alone, with no torch and no model: admission into slots and the
prefill budget, the decode step's bucket and span, streaming and stops per group, freeing slots, and
failures. Token ids are characters here (a stand-in tokenizer), so texts are easy to read."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.continuous.scheduler import Group, Scheduler, SlotMove
from engine.detokenizer import Detokenizer
from serve_app.stage_types import GenerationChunk, SamplingParams

ROOT = Path(__file__).resolve().parents[3]
EOS = frozenset({0})


class CharTokenizer:
    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) for t in tokens if t)


@dataclass
class Request:
    """What the scheduler reads of a prepared request."""

    prompt_tokens: int
    max_tokens: int = 8
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=8, temperature=0.0))
    cancelled: bool = False
    image_tokens: int = 0


def group(scheduler: Scheduler, *requests: Request) -> tuple[Group, list]:
    """Submit `requests` as one group; returns it and the list its callback fills."""
    calls: list = []
    made = Group.of(list(requests), calls.append, Detokenizer, CharTokenizer())
    scheduler.add(made)
    return made, calls


def scheduler(slots: int = 4, max_prefill_tokens: int = 100, buckets=(1, 2, 4, 8)) -> Scheduler:
    return Scheduler(slots, max_len=64, max_prefill_tokens=max_prefill_tokens, buckets=list(buckets),
                     min_length_bucket=16)


def test_it_needs_no_torch() -> None:
    probe = "import sys, engine.continuous.scheduler; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_admission_fills_free_slots_oldest_first_within_the_prefill_budget() -> None:
    s = scheduler(slots=3, max_prefill_tokens=60)
    group(s, Request(10), Request(20), Request(25), Request(5))
    first = s.schedule_prefill()
    # Padded to the widest prompt: 2 x 20 fits 60, 3 x 25 does not.
    assert [r.request.prompt_tokens for r in first.rows] == [10, 20] and first.first_slot == 0
    s.admit(first)
    second = s.schedule_prefill()
    assert [r.request.prompt_tokens for r in second.rows] == [25] and second.first_slot == 2
    s.admit(second)
    assert s.schedule_prefill() is None  # no free slot: the fourth waits
    assert [r.request.prompt_tokens for r in s.live] == [10, 20, 25] and len(s.waiting) == 1


def test_a_prompt_over_the_budget_still_goes_alone() -> None:
    s = scheduler(max_prefill_tokens=16)
    group(s, Request(40), Request(3))
    assert [r.request.prompt_tokens for r in s.schedule_prefill().rows] == [40]


def test_a_request_that_cannot_fit_a_slot_is_refused() -> None:
    s = scheduler()
    with pytest.raises(ValueError, match="do not fit a 64-token slot"):
        s.check(Request(60, max_tokens=5))
    s.check(Request(59, max_tokens=5))


def test_the_decode_step_runs_at_a_bucket_over_a_span_that_covers_every_row() -> None:
    s = scheduler(slots=6, buckets=(1, 2, 4, 16))
    assert s.buckets == [1, 2, 4, 6]  # capped at the slots
    sampled = SamplingParams(max_tokens=8, temperature=0.7)
    group(s, Request(10), Request(17), Request(3, sampling=sampled))
    s.admit(s.schedule_prefill())
    step = s.schedule_decode()
    assert (len(step.rows), step.bucket, step.span, step.sampled) == (3, 4, 32, True)  # 17 + 1 -> 32
    s.launched(step)
    assert [r.cache_len for r in s.live] == [11, 18, 4]
    assert scheduler().schedule_decode() is None


def test_tokens_stream_per_group_and_a_group_completes_after_its_last_callback() -> None:
    s = scheduler()
    a, a_calls = group(s, Request(4, max_tokens=3), Request(4, max_tokens=5))
    b, b_calls = group(s, Request(4, sampling=SamplingParams(max_tokens=8, temperature=0.0, stop=("!",))))
    s.admit(s.schedule_prefill())
    rows = list(s.live)

    def step(text: str) -> None:
        result = s.postprocess(rows, [ord(c) if c != "$" else 0 for c in text], EOS)
        for g, entries in result.outputs.items():
            g.on_step(entries)
        for row in result.ended:
            s.finish(row)

    step("hHo")
    assert a_calls[-1][0].text == "h" and a_calls[-1][1].text == "H" and b_calls[-1] == [GenerationChunk("o", 4, 1)]
    step("iIk")
    step("!$!")  # row 0 reaches max_tokens; row 1 ends on end-of-sequence; row 2 on its stop sequence
    assert a_calls[-1] == [GenerationChunk("!", 4, 3, "length"), GenerationChunk("", 4, 2, "stop")]
    assert [c[0] for c in b_calls] == [GenerationChunk("o", 4, 1), GenerationChunk("k", 4, 2),
                                       GenerationChunk("", 4, 3, "stop")]  # the stop sequence is cut
    assert a.future.done() and b.future.done()
    before = len(a_calls)
    step("xyz")  # the extra step launched before the ends were known: dropped
    assert len(a_calls) == before


def test_finished_rows_free_their_slots_and_the_last_live_row_fills_each_hole() -> None:
    s = scheduler(slots=5)
    group(s, *(Request(n) for n in (1, 2, 3, 4, 5)))
    s.admit(s.schedule_prefill())
    s.live[1].done = s.live[3].done = True
    moves = s.release_finished()
    # Slot 3 first: the last row (5 tokens) moves into it; then slot 1 gets the new last one (the 5 again).
    assert moves == [SlotMove(3, 4, 5), SlotMove(1, 3, 5)]
    assert [r.request.prompt_tokens for r in s.live] == [1, 5, 3]
    s.live[2].done = True
    assert s.release_finished() == [SlotMove(2, 2, 3)]  # the last slot itself: nothing moves


def test_a_cancelled_request_is_dropped_before_it_takes_a_slot() -> None:
    s = scheduler(slots=1)
    running, _ = group(s, Request(4))
    s.admit(s.schedule_prefill())
    queued, calls = group(s, Request(4))
    queued.rows[0].request.cancelled = True
    assert s.schedule_prefill() is None and not s.waiting
    assert queued.future.done() and queued.future.exception() is None and calls == []
    assert not running.future.done()


def test_a_failed_prefill_fails_its_groups_and_a_failed_step_everything() -> None:
    s = scheduler()
    live, _ = group(s, Request(4))
    s.admit(s.schedule_prefill())
    doomed, _ = group(s, Request(4), Request(5))
    s.reject(s.schedule_prefill(), RuntimeError("refused"))
    assert isinstance(doomed.future.exception(), RuntimeError) and not live.future.done()
    assert [r.request.prompt_tokens for r in s.live] == [4]
    waiting, _ = group(s, Request(6))
    s.fail_all(RuntimeError("device lost"))
    for g in (live, waiting):
        assert str(g.future.exception()) == "device lost"
    assert not s.has_work
