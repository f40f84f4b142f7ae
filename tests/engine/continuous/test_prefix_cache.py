"""Prefix caching without a model: block keys (tokens, images, salt) and the scheduler admitting a
prompt after its cached blocks, registering what prefills and decodes fill, never sharing across
images or salts, and counting what it found. Token ids are small integers; 99 is the image token."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.continuous.blocks import BlockPool
from engine.continuous.prefix_cache import ImageSpan, PrefixCaching, block_key, chain_keys
from engine.continuous.scheduler import Group, PrefillChunk, Scheduler, SlotRow
from engine.detokenizer import Detokenizer
from serve_app.stage_types import SamplingParams

IMAGE = 99
BLOCK = 4
GRID = (1, 4, 4)  # 16 patches, 4 image tokens after a 2x2 merge
EOS = frozenset({0})
PREFIX = PrefixCaching(IMAGE, merge_units=4)


class CharTokenizer:
    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(48 + t % 40) for t in tokens if t)


@dataclass
class Request:
    """What the scheduler reads of a prepared request."""

    input_ids: list[int]
    image_grid_thw: list = field(default_factory=list)
    image_hashes: tuple[str, ...] = ()
    cache_salt: str | None = None
    max_tokens: int = 8
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=8, temperature=0.0))
    cancelled: bool = False
    image_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


def with_image(before: list[int], digest: str, after: list[int], **fields) -> Request:
    return Request([*before, *[IMAGE] * 4, *after], [GRID], (digest,), **fields)


def scheduler(blocks: int = 64, max_prefill_tokens: int = 100) -> Scheduler:
    return Scheduler(4, max_len=64, max_prefill_tokens=max_prefill_tokens, buckets=[1, 2, 4], min_length_bucket=16,
                     pool=BlockPool(blocks, BLOCK), prefix=PREFIX)


def submit(s: Scheduler, *requests: Request) -> tuple[Group, list]:
    calls: list = []
    made = Group.of(list(requests), calls.append, Detokenizer, CharTokenizer())
    s.add(made)
    return made, calls


def serve(s: Scheduler, *requests: Request, output: tuple[int, ...] = ()) -> list[SlotRow]:
    """Prefill `requests` (one pass each), decode `output` for each, finish them and free their blocks;
    returns their rows."""
    group, _ = submit(s, *requests)
    while (batch := s.schedule_prefill()) is not None:
        s.prefilled(batch)
    for token in [*output, 0]:
        step = s.schedule_decode()
        s.launched(step)
        result = s.postprocess(step.rows, step.incarnations, [token] * len(step.rows), EOS)
        for row in result.ended:
            s.finish(row)
    s.release_finished()
    return group.rows


def first_chunk(s: Scheduler, request: Request) -> PrefillChunk:
    """The first chunk `request` gets (its pass settled)."""
    submit(s, request)
    batch = s.schedule_prefill()
    s.prefilled(batch)
    return batch.chunks[0]


def test_keys_chain_over_tokens_images_and_salt() -> None:
    tokens = list(range(1, 13))
    keys = chain_keys(tokens, BLOCK, [], None)
    assert len(keys) == 3 and chain_keys(tokens[:8], BLOCK, [], None) == keys[:2]
    assert chain_keys(tokens + [1, 2], BLOCK, [], None, known=keys[:1]) == keys  # extends what is known
    changed = chain_keys([1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12], BLOCK, [], None)
    assert changed[0] == keys[0] and changed[1:] != keys[1:] and changed[2] != keys[2]  # the chain carries it
    assert chain_keys(tokens, BLOCK, [], "tenant")[0] != keys[0] and chain_keys(tokens, BLOCK, [], "")[0] != keys[0]
    picture = [ImageSpan(5, 9, "a")]
    with_a = chain_keys(tokens, BLOCK, picture, None)
    assert with_a[0] == keys[0] and with_a[1] != keys[1]  # only from the first block the image overlaps
    assert chain_keys(tokens, BLOCK, [ImageSpan(5, 9, "b")], None)[1] != with_a[1]
    assert block_key(None, tokens[:4], 0, picture, None) == keys[0]


def test_spans_follow_the_grids_and_refuse_what_does_not_add_up() -> None:
    request = Request([1, IMAGE, IMAGE, IMAGE, IMAGE, 2, IMAGE, IMAGE, 3], [GRID, (1, 2, 4)], ("a", "b"))
    assert PREFIX.spans(request) == [ImageSpan(1, 5, "a"), ImageSpan(6, 8, "b")]
    assert PREFIX.spans(Request([1, IMAGE, IMAGE], [GRID], ("a",))) is None  # 2 tokens for 4
    assert PREFIX.spans(Request([IMAGE] * 4, [GRID], ())) is None  # no digest: not keyed
    assert PREFIX.spans(Request([1, 2])) == []


def test_a_prompt_that_starts_as_an_earlier_one_prefills_only_the_rest() -> None:
    s = scheduler()
    turn1 = list(range(1, 11))  # 10 tokens: 2 full blocks
    (first,) = serve(s, Request(turn1))
    assert first.cached_tokens == 0 and s.pool.free == s.pool.capacity and s.pool.cached == 2
    chunk = first_chunk(s, Request([*turn1, 11, 12, 13, 14, 15, 16]))
    assert (chunk.start, chunk.end) == (8, 16) and chunk.begins
    row = chunk.row
    assert s.pool.lookup(row.keys[:2]) == row.blocks[:2] and row.cached_tokens == 8 and s.pool.refs(row.blocks[0]) == 1
    assert (s.prefix_queried_tokens, s.prefix_hit_tokens) == (10 + 16, 8)


def test_a_wholly_cached_prompt_still_computes_its_last_token() -> None:
    s = scheduler()
    prompt = list(range(1, 13))  # 3 full blocks
    serve(s, Request(prompt))
    chunk = first_chunk(s, Request(prompt))
    assert (chunk.start, chunk.end) == (8, 12)  # the last block again, for the logits of its last position
    assert chunk.row.blocks[2] not in s.pool.lookup(chunk.row.keys)  # a block of its own (a duplicate)


def test_decoded_blocks_are_cached_once_full_and_the_next_turn_finds_them() -> None:
    s = scheduler()
    turn1 = list(range(1, 7))  # 6 prompt tokens
    answer = [21, 22, 23, 24, 25, 26, 27]
    (row,) = serve(s, Request(turn1, max_tokens=20), output=answer)
    assert row.output_ids == [*answer, 0]
    # Cached: positions 0..11 (prompt 6 + answer 6); position 12 holds the 7th answer token but its block
    # is not full.
    assert s.pool.cached == 3
    assert first_chunk(s, Request([*turn1, *answer, 30, 31, 32])).start == 12


def test_the_same_text_with_another_image_never_shares_the_image_blocks() -> None:
    s = scheduler()
    text_before, text_after = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14]
    (cat,) = serve(s, with_image(text_before, "cat", text_after))
    dog = first_chunk(s, with_image(text_before, "dog", text_after))
    # The image's tokens begin in the second block: only the first (text alone) is shared.
    assert dog.start == 4 and dog.row.blocks[0] == s.pool.lookup(cat.keys[:1])[0]
    assert not set(dog.row.blocks[1:]) & set(s.pool.lookup(cat.keys))
    assert s.pool.lookup(dog.row.keys)[1:] == dog.row.blocks[1:4]  # registered under keys of its own
    again = first_chunk(s, with_image(text_before, "cat", text_after))
    assert again.start == 16  # the same picture: every full block before the last token
    assert again.row.blocks[:4] == s.pool.lookup(cat.keys[:4])


def test_a_cache_salt_keeps_tenants_apart_and_equal_salts_share() -> None:
    s = scheduler()
    prompt = list(range(1, 14))
    serve(s, Request(prompt, cache_salt="tenant-a"))
    for salt, expected in ((None, 0), ("tenant-b", 0), ("tenant-a", 12)):
        (row,) = serve(s, Request(prompt, cache_salt=salt))
        assert row.cached_tokens == expected, salt
    assert s.pool.free == s.pool.capacity


def test_cached_blocks_nobody_holds_are_room_for_new_prompts() -> None:
    s = scheduler(blocks=9)  # 8 usable, watermark 1
    (old,) = serve(s, Request(list(range(1, 29))))  # 7 full blocks, cached when it ends, and an 8th
    assert s.pool.cached == 7 and s.pool.free == 8
    chunk = first_chunk(s, Request(list(range(100, 128))))  # 7 other blocks: the plain one, and 6 evicted
    assert (chunk.start, chunk.end) == (0, 28) and len(chunk.row.blocks) == 7
    assert s.pool.lookup(chunk.row.keys) == chunk.row.blocks  # its own, cached now
    assert len(s.pool.lookup(old.keys)) == 1 and s.pool.cached == 8  # the old chain's start went last


def test_chunks_report_the_cached_tokens_and_a_failed_prefill_gives_its_blocks_back() -> None:
    s = scheduler()
    prompt = list(range(1, 14))
    serve(s, Request(prompt))
    _, calls = submit(s, Request([*prompt, 50]))
    batch = s.schedule_prefill()
    s.prefilled(batch)
    step = s.schedule_decode()
    s.launched(step)
    result = s.postprocess(step.rows, step.incarnations, [5], EOS)
    for group, entries in result.outputs.items():
        group.on_step(entries)
    assert calls[-1][0].cached_tokens == 12 and calls[-1][0].prompt_tokens == 14
    s.live[0].done = True
    s.release_finished()
    submit(s, Request([*prompt, 60]))
    s.reject(s.schedule_prefill(), RuntimeError("refused"))
    assert s.pool.free == s.pool.capacity and all(s.pool.refs(b) == 0 for b in range(s.pool.num_blocks))


def test_a_pass_runs_fresh_prompts_together_and_each_cached_one_after_its_prefix() -> None:
    s = scheduler(max_prefill_tokens=16)
    prompt = list(range(1, 11))
    serve(s, Request(prompt))
    submit(s, Request(list(range(60, 70))), Request([*prompt, 40, 41, 42, 43]), Request([*prompt, 44, 45]))
    batch = s.schedule_prefill()
    # 10 fresh tokens, then 6 after a cached prefix of 8: the budget of 16 is spent, the third waits.
    assert [(c.start, c.end, c.begins) for c in batch.chunks] == [(0, 10, True), (8, 14, True)]
    assert [len(c.row.blocks) for c in batch.chunks] == [3, 4] and len(s.waiting) == 1
