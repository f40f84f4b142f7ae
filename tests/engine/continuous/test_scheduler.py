"""The continuous engine's scheduler alone, with no torch and no model: admission into slots and KV
blocks within the prefill budget, chunked prefill, the decode step's bucket and span, blocks taken
as rows grow and preemption when they run out, streaming and stops per group, freeing slots and
blocks, and failures. Token ids are characters here (a stand-in tokenizer), so texts are easy to read."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.continuous.blocks import BlockPool
from engine.continuous.scheduler import BlockGrant, Group, PrefillChunk, Scheduler, SlotMove
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

    @property
    def input_ids(self) -> list[int]:
        return [ord("a")] * self.prompt_tokens


def group(scheduler: Scheduler, *requests: Request) -> tuple[Group, list]:
    """Submit `requests` as one group; returns it and the list its callback fills."""
    calls: list = []
    made = Group.of(list(requests), calls.append, Detokenizer, CharTokenizer())
    scheduler.add(made)
    return made, calls


def scheduler(slots: int = 4, max_prefill_tokens: int = 100, buckets=(1, 2, 4, 8), blocks: int = 200,
              block_size: int = 4) -> Scheduler:
    return Scheduler(slots, max_len=64, max_prefill_tokens=max_prefill_tokens, buckets=list(buckets),
                     min_length_bucket=16, pool=BlockPool(blocks, block_size))


def prefill_all(s: Scheduler) -> None:
    """Run prefill passes until no prompt is waiting for one."""
    while (batch := s.schedule_prefill()) is not None:
        s.prefilled(batch)


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
    # Padded to the widest prompt: 2 x 20 fits 60. A third row has room for 60 // 3 = 20 tokens, so
    # the 25-token prompt comes as the pass's last row, cut short at 20, and goes on alone next.
    assert [(c.row.request.prompt_tokens, c.start, c.end) for c in first.chunks] == [(10, 0, 10), (20, 0, 20),
                                                                                      (25, 0, 20)]
    assert first.first_slot == 0 and [r.request.prompt_tokens for r in first.completing] == [10, 20]
    s.prefilled(first)
    second = s.schedule_prefill()
    assert [(c.start, c.end, c.completes) for c in second.chunks] == [(20, 25, True)] and second.first_slot == 2
    s.prefilled(second)
    assert s.schedule_prefill() is None  # no free slot: the fourth waits
    assert [r.request.prompt_tokens for r in s.live] == [10, 20, 25] and len(s.waiting) == 1


def test_a_prompt_over_the_budget_is_prefilled_in_chunks_one_pass_at_a_time() -> None:
    s = scheduler(max_prefill_tokens=16)
    group(s, Request(40), Request(3))
    passes = []
    while (batch := s.schedule_prefill()) is not None:
        passes.append([(c.start, c.end) for c in batch.chunks])
        s.prefilled(batch)
        if s.live:
            break
    # The long prompt goes on alone until it is done; the short one waits for the pass after.
    assert passes == [[(0, 16)], [(16, 32)], [(32, 40)]]
    assert [r.request.prompt_tokens for r in s.live] == [40] and s.live[0].cache_len == 40
    assert [(c.start, c.end) for c in s.schedule_prefill().chunks] == [(0, 3)]


def test_prompt_chunks_take_blocks_as_they_go_and_decoding_rows_as_they_grow() -> None:
    s = scheduler(max_prefill_tokens=8, block_size=4)
    group(s, Request(10))
    s.prefilled(s.schedule_prefill())  # positions 0..7: two blocks
    row = s.prefilling
    assert row.blocks == [1, 2]
    s.prefilled(s.schedule_prefill())  # 8..9: a third
    assert row.blocks == [1, 2, 3] and s.live == [row]
    step = s.schedule_decode()  # writes position 10: still the third block, nothing new for the device
    assert step.grown == []
    s.launched(step)
    s.launched(s.schedule_decode())  # position 11
    step = s.schedule_decode()  # position 12: a fourth block, which the device's table gets
    assert row.blocks == [1, 2, 3, 4] and step.grown == [BlockGrant(0, 3, 4)]


def test_finished_rows_give_their_blocks_back() -> None:
    s = scheduler(blocks=20, block_size=4)
    group(s, Request(9), Request(5))
    prefill_all(s)
    assert s.pool.free == 19 - 3 - 2
    s.live[0].done = True
    s.release_finished()
    assert s.pool.free == 19 - 2
    s.fail_all(RuntimeError("gone"))
    assert s.pool.free == 19


def test_admission_waits_for_blocks_and_keeps_a_watermark_free() -> None:
    s = scheduler(blocks=11, block_size=4)  # 10 usable blocks, watermark 1
    group(s, Request(20), Request(20))  # 5 blocks each
    batch = s.schedule_prefill()
    assert [c.row.request.prompt_tokens for c in batch.chunks] == [20]  # the second would leave 0 free
    s.prefilled(batch)
    assert s.schedule_prefill() is None and len(s.waiting) == 1


def test_when_blocks_run_out_the_youngest_row_is_preempted_and_resumes_with_its_output() -> None:
    s = scheduler(blocks=7, block_size=4, max_prefill_tokens=100)  # 6 usable blocks, watermark 1
    group(s, Request(8, max_tokens=20))
    s.prefilled(s.schedule_prefill())  # 2 blocks
    _, young_calls = group(s, Request(8, max_tokens=20))
    s.prefilled(s.schedule_prefill())  # 2 more: 2 free
    older, younger = s.live
    tokens = iter(range(ord("A"), ord("z")))

    def run_step() -> None:
        step = s.schedule_decode()
        s.launched(step)
        result = s.postprocess(step.rows, step.incarnations, [next(tokens) for _ in step.rows], EOS)
        for g, entries in result.outputs.items():
            g.on_step(entries)

    for _ in range(8):  # each row grows to 16 positions: 4 blocks each, 8 wanted, 6 there
        run_step()
    assert s.live == [older] and s.preemptions == 1 and s.waiting[0] is younger
    assert younger.blocks == [] and younger.resume_ids == [ord("a")] * 8 + younger.output_ids
    assert len(older.blocks) == 4 and s.pool.free == 2
    # Its text so far stays sent; when blocks free up it is prefilled again, prompt and output.
    sent = "".join(c[0].text for c in young_calls if c[0])
    assert sent and len(younger.output_ids) == younger.generated
    older.done = True
    s.release_finished()
    batch = s.schedule_prefill()
    assert batch.chunks == [PrefillChunk(younger, 0, 8 + len(younger.output_ids))]


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
    prefill_all(s)
    step = s.schedule_decode()
    assert (len(step.rows), step.bucket, step.span, step.sampled) == (3, 4, 32, True)  # 17 + 1 -> 32
    s.launched(step)
    assert [r.cache_len for r in s.live] == [11, 18, 4]
    assert scheduler().schedule_decode() is None


def test_tokens_stream_per_group_and_a_group_completes_after_its_last_callback() -> None:
    s = scheduler()
    a, a_calls = group(s, Request(4, max_tokens=3), Request(4, max_tokens=5))
    b, b_calls = group(s, Request(4, sampling=SamplingParams(max_tokens=8, temperature=0.0, stop=("!",))))
    s.prefilled(s.schedule_prefill())
    rows = list(s.live)

    def step(text: str) -> None:
        result = s.postprocess(rows, [r.incarnation for r in rows], [ord(c) if c != "$" else 0 for c in text], EOS)
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
    s.prefilled(s.schedule_prefill())
    s.live[1].done = s.live[3].done = True
    moves = s.release_finished()
    # Slot 3 first: the last row (5 tokens) moves into it; then slot 1 gets the new last one (the 5 again).
    assert moves == [SlotMove(3, 4), SlotMove(1, 3)]
    assert [r.request.prompt_tokens for r in s.live] == [1, 5, 3]
    s.live[2].done = True
    assert s.release_finished() == [SlotMove(2, 2)]  # the last slot itself: nothing moves


def test_a_cancelled_request_is_dropped_before_it_takes_a_slot() -> None:
    s = scheduler(slots=1)
    running, _ = group(s, Request(4))
    s.prefilled(s.schedule_prefill())
    queued, calls = group(s, Request(4))
    queued.rows[0].request.cancelled = True
    assert s.schedule_prefill() is None and not s.waiting
    assert queued.future.done() and queued.future.exception() is None and calls == []
    assert not running.future.done()


def test_a_failed_prefill_fails_its_groups_and_a_failed_step_everything() -> None:
    s = scheduler()
    live, _ = group(s, Request(4))
    s.prefilled(s.schedule_prefill())
    doomed, _ = group(s, Request(4), Request(5))
    s.reject(s.schedule_prefill(), RuntimeError("refused"))
    assert isinstance(doomed.future.exception(), RuntimeError) and not live.future.done()
    assert [r.request.prompt_tokens for r in s.live] == [4]
    waiting, _ = group(s, Request(6))
    s.fail_all(RuntimeError("device lost"))
    for g in (live, waiting):
        assert str(g.future.exception()) == "device lost"
    assert not s.has_work
