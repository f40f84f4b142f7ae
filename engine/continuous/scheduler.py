"""Scheduler: which sequences the continuous engine runs at each step. Bookkeeping only, no tensors.

The engine's loop asks it, every iteration:
1. `schedule_prefill`: the prompt chunks to prefill now, within `max_prefill_tokens` (padded) per
   pass (chunked prefill, as vLLM and SGLang do it): the rest of a prompt part-way through, else
   waiting requests oldest first, as many as there are free slots and KV blocks above a watermark,
   the last one possibly cut short to go on in the next passes. A long prompt so takes several
   passes, each followed by a decode step of the running rows, which never pause for more than one
   pass. With prefix caching (prefix_cache.py, blocks.py), a new prompt first holds the longest run
   of cached blocks that match its leading full blocks and prefills only the rest (always its last
   token at least, whose logits it samples from). Rows whose prompt completes take the slots after
   the live ones; `prefilled` (it ran: the blocks it filled are registered in the cache) or
   `reject` (the model refused it) settles a pass.
2. `schedule_decode`: the decode step over every live row: the blocks each row needs for the
   position it writes (taken oldest row first; when none are left the youngest rows are preempted
   and later recomputed, so the cache never overflows), the batch bucket it runs at (the smallest
   captured size that holds them all), the cache span attention reads (a power of two above the
   longest sequence, at least `min_length_bucket`), and whether any row samples.
3. `postprocess`: one step's sampled tokens, one per row of that step, advanced row by row
   (`RowState.advance`: text, stops, limits, cancellation), gathered per group for the callbacks;
   a decoded block, once full and its tokens known, is registered in the prefix cache too.
4. `release_finished`: frees the slots and blocks of finished rows, moving the last live row into
   each hole so the live rows always hold slots 0..n-1 (a decode step over the first B slots covers
   them all).
A group (one `submit` call) completes when all its rows are finished; a failure fails its group.

Not thread-safe: the engine calls it from its loop, and `add` / `schedule_prefill` / `fail_all`
under the engine's lock, since requests arrive from other threads.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from engine.continuous.blocks import BlockPool, blocks_for
from engine.continuous.prefix_cache import ImageSpan, Key, PrefixCaching, block_key, chain_keys
from engine.detokenizer import Detokenizer
from engine.protocol import StepCallback, StepOutput
from engine.rows import RowState
from serve_app.stage_types import GenerationChunk

logger = logging.getLogger("ray.serve")


@dataclass(eq=False)
class Group:
    """One `submit` call: its callback, its future and its rows (in submission order)."""

    on_step: StepCallback
    future: Future = field(default_factory=Future)
    rows: list[SlotRow] = field(default_factory=list)
    open_rows: int = 0
    failed: bool = False

    @classmethod
    def of(cls, batch: list, on_step: StepCallback,
           detokenizer: Callable[[object, tuple[str, ...]], Detokenizer], tokenizer: object) -> Group:
        """A group of one row per prepared request of `batch`."""
        group = cls(on_step, open_rows=len(batch))
        group.rows = [SlotRow(request, detokenizer(tokenizer, request.sampling.stop), group=group, index=i)
                      for i, request in enumerate(batch)]
        by_request = {id(row.request): row for row in group.rows}
        for row in group.rows:  # a request's later choices share its first choice's prompt
            leader = getattr(row.request, "prompt_of", None)
            row.leader = by_request.get(id(leader)) if leader is not None else None
        if not batch:
            group.future.set_result(None)
        return group


@dataclass(eq=False)
class SlotRow(RowState):
    """A request in the continuous engine: its row state, its group, and its place in the KV cache."""

    group: Group | None = None
    index: int = 0  # position in its group (where its entries go in the callback's list)
    cache_len: int = 0  # tokens in its blocks once every launched step has run
    closed: bool = False  # counted off its group
    blocks: list[int] = field(default_factory=list)  # its block table, in sequence order
    table_len: int = 0  # entries of `blocks` in its slot's block table on the device
    prefilled: int = 0  # tokens of `prompt_ids` already in its blocks (the prefill may take several chunks)
    output_ids: list[int] = field(default_factory=list)  # tokens it was given so far
    # Raised when the row is preempted: tokens of steps launched before then are not its any more.
    incarnation: int = 0
    admitted: int = 0  # admission order (the youngest live row is preempted first)
    # What its prefill runs: the prompt, plus the output so far for a row preempted mid-answer (the
    # prefill recomputes its cache and samples its next token from there).
    resume_ids: list[int] | None = None
    # Another choice of the same request, whose prefill this row copies rather than runs again.
    leader: SlotRow | None = None
    # Prefix caching: where its images lie (None: its blocks are not keyed, e.g. caching is off), the
    # keys of its leading full blocks (of request.input_ids + output_ids, what its cache holds), how
    # many of its leading blocks were offered to the cache, the prompt tokens this incarnation took
    # from the cache, and those its first admission took (what its usage reports).
    spans: list[ImageSpan] | None = None
    keys: list[Key] = field(default_factory=list)
    registered: int = 0
    hit: int = 0
    cached_tokens: int = 0

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.input_ids if self.resume_ids is None else self.resume_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of what its cache holds: its prompt, then its output."""
        prompt = self.request.input_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_ids[start - len(prompt):end - len(prompt)]
        return [*prompt[start:], *self.output_ids[:end - len(prompt)]]

    def chunk(self, text: str, finish_reason: str | None = None) -> GenerationChunk:
        """As RowState's, with the prompt tokens its prefill took from the prefix cache."""
        made = super().chunk(text, finish_reason)
        return replace(made, cached_tokens=self.cached_tokens) if self.cached_tokens else made


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions start..end-1 of `row` go into its blocks in this pass; `completes`: the last
    chunk of its prompt, after which the row decodes; `begins`: its first chunk, which starts at 0 or,
    where its first blocks came from the prefix cache, after them. With `copy_of` (another choice of
    the same request, completing earlier in the same pass) the row's blocks get a copy of that row's,
    and nothing runs for it."""

    row: SlotRow
    start: int
    end: int
    copy_of: SlotRow | None = None

    @property
    def completes(self) -> bool:
        return self.end == len(self.row.prompt_ids)

    @property
    def begins(self) -> bool:
        return self.start == self.row.hit


@dataclass
class PrefillBatch:
    """One prefill pass: chunks of prompts, those that complete their prompt first, in the order
    their rows take slots first_slot, first_slot + 1, ...; at most the last one does not complete.
    Either every chunk begins a prompt, or the batch is one chunk continuing a prompt (and copies).
    Chunks that begin at 0 run together, padded to the widest; one that begins after a cached
    prefix runs alone, as a continued one does, attending over the blocks before it."""

    chunks: list[PrefillChunk]
    first_slot: int

    @property
    def rows(self) -> list[SlotRow]:
        return [chunk.row for chunk in self.chunks]

    @property
    def computed(self) -> list[PrefillChunk]:
        """The chunks the pass runs through the model (not copies)."""
        return [chunk for chunk in self.chunks if chunk.copy_of is None]

    @property
    def completing(self) -> list[SlotRow]:
        return [chunk.row for chunk in self.chunks if chunk.completes]


@dataclass
class DecodeBatch:
    """One decode step: output i belongs to rows[i], the row in slot i. Before it runs, the runner
    applies `moves` (rows preempted to make room) then `grown` (blocks the rows took)."""

    rows: list[SlotRow]
    bucket: int  # slots the step runs over (inactive ones padded in): a captured batch size
    span: int  # cache positions attention reads
    sampled: bool  # any row samples (else the all-greedy variant of the step runs)
    logprobs: bool = False  # any row wants logprobs (then the variant of the step that computes them runs)
    moves: list[SlotMove] = field(default_factory=list)
    grown: list[BlockGrant] = field(default_factory=list)

    @property
    def incarnations(self) -> list[int]:
        return [row.incarnation for row in self.rows]


@dataclass(frozen=True)
class SlotMove:
    """Freeing `slot`: the last live slot, `source`, moves into it (nothing moves when source == slot);
    `source` is then empty."""

    slot: int
    source: int


@dataclass(frozen=True)
class BlockGrant:
    """Entry `index` of `slot`'s block table is now `block`."""

    slot: int
    index: int
    block: int


@dataclass
class StepResult:
    """What one step's tokens did: each group's callback entries, and the rows that ended."""

    outputs: dict[Group, list[StepOutput]]
    ended: list[SlotRow]
    tokens: int  # rows advanced


class Scheduler:
    def __init__(self, slots: int, max_len: int, max_prefill_tokens: int, buckets: list[int],
                 min_length_bucket: int, pool: BlockPool, prefix: PrefixCaching | None = None) -> None:
        self.slots = slots
        self.max_len = max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.buckets = sorted({b for b in buckets if b < slots} | {slots})
        self.min_length_bucket = min_length_bucket
        self.pool = pool
        self.block_size = pool.block_size
        # Blocks kept free when admitting a new prompt, so the live rows can grow a while before one
        # must be preempted (vLLM keeps 1% likewise).
        self.watermark = max(1, pool.capacity // 100)
        self.waiting: deque[SlotRow] = deque()
        self.prefilling: SlotRow | None = None  # a prompt part-way through its chunks
        self.live: list[SlotRow] = []  # index = slot
        self.preemptions = 0
        self._admissions = 0
        self.prefix = prefix  # None: no prefix caching
        # Prompt tokens admitted while prefix caching is on, and those of them taken from the cache.
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.live or self.prefilling)

    @property
    def constrained(self) -> bool:
        """Whether a live row decodes under a grammar."""
        return any(row.grammar is not None for row in self.live)

    # ---- arrivals ---------------------------------------------------------------------------------

    def check(self, request) -> None:
        """Raises ValueError when `request` can never fit: not in a sequence, or not in the whole cache."""
        total = request.prompt_tokens + request.max_tokens
        if total > self.max_len:
            raise ValueError(f"{request.prompt_tokens} prompt + {request.max_tokens} new tokens do not fit a "
                             f"{self.max_len}-token slot")
        if blocks_for(total, self.block_size) > self.pool.capacity:
            raise ValueError(f"{total} tokens do not fit the KV cache ({self.pool.capacity} blocks of "
                             f"{self.block_size})")

    def add(self, group: Group) -> None:
        """Queue the group's rows, each with its images' places in its prompt when prefix caching is on."""
        if self.prefix is not None:
            for row in group.rows:
                row.spans = self.prefix.spans(row.request)
        self.waiting.extend(group.rows)

    def schedule_prefill(self) -> PrefillBatch | None:
        """The prompt chunks to prefill now, at most `max_prefill_tokens` (padded) in all, their
        blocks taken: the rest of a prompt part-way through, else new prompts oldest first (the
        last of them possibly cut short, to go on in the next passes), as many as there are free
        slots and free blocks above the watermark. A new prompt whose first blocks are cached holds
        them and begins after them."""
        self._drop_abandoned()
        if self.prefilling is not None:
            return self._continue_prefill(self.prefilling)
        chunks: list[PrefillChunk] = []
        width = 0  # of the chunks that begin at 0, run together padded to the widest
        together = alone = 0  # those chunks, and the tokens of the ones that run alone
        while self.waiting and len(self.live) + len(chunks) < self.slots:
            row = self.waiting[0]
            if self._copies(row, chunks):
                if not self._grow(row, len(row.prompt_ids), self.watermark):
                    break
                chunks.append(PrefillChunk(self.waiting.popleft(), 0, len(row.prompt_ids), copy_of=row.leader))
                continue
            length = len(row.prompt_ids)
            hits = self._hits(row)
            start = len(hits) * self.block_size
            computed = together or alone
            if start == 0:
                room = (self.max_prefill_tokens - alone) // (together + 1)  # the widest chunk within the budget
                end = min(length, room)
                if computed and (width > room or end < min(length, self.block_size)):
                    break  # no room for it, or only for a piece too small to be worth a row
            else:
                end = min(length, start + self.max_prefill_tokens - alone - together * width)
                if computed and end - start < min(length - start, self.block_size):
                    break
            if not self._admit(row, hits, end):
                break
            self.waiting.popleft()
            chunks.append(PrefillChunk(row, start, end))
            if start == 0:
                together, width = together + 1, max(width, end)
            else:
                alone += end - start
            if end < length:  # cut short: it goes on alone in the next passes
                self.prefilling = row
                break
        return PrefillBatch(chunks, len(self.live)) if chunks else None

    @staticmethod
    def _copies(row: SlotRow, chunks: list[PrefillChunk]) -> bool:
        """Whether `row` can copy its leader's prefill in this pass (its leader's prompt completes in it)."""
        return (row.leader is not None and row.resume_ids is None
                and any(chunk.row is row.leader and chunk.completes and chunk.copy_of is None for chunk in chunks))

    def _continue_prefill(self, row: SlotRow) -> PrefillBatch | None:
        length = len(row.prompt_ids)
        end = min(length, row.prefilled + self.max_prefill_tokens)
        if end == length and len(self.live) >= self.slots:
            return None  # its last chunk waits for a slot to decode in
        if not self._grow(row, end, 0):
            return None  # waits for blocks the live rows give back
        chunks = [PrefillChunk(row, row.prefilled, end)]
        while (self.waiting and len(self.live) + len(chunks) < self.slots and self._copies(self.waiting[0], chunks)
               and self._grow(self.waiting[0], len(self.waiting[0].prompt_ids), self.watermark)):
            follower = self.waiting.popleft()
            chunks.append(PrefillChunk(follower, 0, len(follower.prompt_ids), copy_of=row))
        return PrefillBatch(chunks, len(self.live))

    def _grow(self, row: SlotRow, tokens: int, keep_free: int) -> bool:
        """Give `row` the blocks for its first `tokens` positions, leaving at least `keep_free` free."""
        wanted = blocks_for(min(tokens, self.max_len), self.block_size) - len(row.blocks)
        if wanted <= 0:
            return True
        if self.pool.free - wanted < keep_free:
            return False
        row.blocks += self.pool.take(wanted)
        return True

    # ---- prefix caching ---------------------------------------------------------------------------

    def _hits(self, row: SlotRow) -> list[int]:
        """The cached blocks that match `row`'s leading full prompt blocks (none held yet), short of its
        last token: a prefill computes that one at least, for the logits its first token is sampled from
        (vLLM likewise)."""
        if row.spans is None:
            return []
        usable = (len(row.prompt_ids) - 1) // self.block_size
        if len(row.keys) < usable:
            row.keys = chain_keys(row.prompt_ids[:usable * self.block_size], self.block_size, row.spans,
                                  self._salt(row), row.keys)
        return self.pool.lookup(row.keys[:usable])

    def _admit(self, row: SlotRow, hits: list[int], end: int) -> bool:
        """Hold `hits` for `row` and take fresh blocks up to position `end`, leaving the watermark free
        (a cached block nobody holds counts as free until it is held)."""
        wanted = blocks_for(min(end, self.max_len), self.block_size) - len(hits)
        if self.pool.free - self.pool.cost(hits) - wanted < self.watermark:
            return False
        self.pool.share(hits)
        row.blocks = [*hits, *self.pool.take(wanted)]
        row.hit = row.prefilled = len(hits) * self.block_size
        row.registered = len(hits)
        if self.prefix is not None:
            self.prefix_queried_tokens += len(row.prompt_ids)
            self.prefix_hit_tokens += row.hit
            if row.incarnation == 0:
                row.cached_tokens = row.hit
        return True

    @staticmethod
    def _salt(row: SlotRow) -> str | None:
        return getattr(row.request, "cache_salt", None)

    def _register(self, row: SlotRow, tokens: int) -> None:
        """Offer `row`'s blocks that its first `tokens` positions fill (contents final and known) to the
        prefix cache, under their keys."""
        if row.spans is None:
            return
        full = min(tokens, len(row.blocks) * self.block_size) // self.block_size
        for index in range(row.registered, full):
            if index == len(row.keys):
                start = index * self.block_size
                row.keys.append(block_key(row.keys[-1] if row.keys else None,
                                          row.tokens(start, start + self.block_size), start, row.spans,
                                          self._salt(row)))
            self.pool.register(row.blocks[index], row.keys[index])
        row.registered = max(row.registered, full)

    def _drop_abandoned(self) -> None:
        """Forget rows whose client went away (or whose group failed) before they decoded."""
        if self.prefilling is not None and (self.prefilling.done or self.prefilling.request.cancelled):
            self._release(self.prefilling)
            self.finish(self.prefilling)
            self.prefilling = None
        if not any(row.done or row.request.cancelled for row in self.waiting):
            return
        keep: deque[SlotRow] = deque()
        for row in self.waiting:
            if row.done or row.request.cancelled:
                if not row.done:
                    logger.info("Dropped a cancelled request from its batch after %d tokens", row.generated)
                self.finish(row)
            else:
                keep.append(row)
        self.waiting = keep

    def prefilled(self, batch: PrefillBatch) -> None:
        """The batch ran: its chunks are cached; the rows that completed their prompt are live."""
        assert batch.first_slot == len(self.live), "rows are admitted into the slots after the live ones"
        for chunk in batch.chunks:
            row = chunk.row
            row.prefilled = row.cache_len = chunk.end
            if chunk.copy_of is not None and row.spans is not None:  # its blocks are the leader's, copied
                row.keys, row.registered = list(chunk.copy_of.keys), chunk.copy_of.registered
            self._register(row, chunk.end)
            if chunk.completes:
                if self.prefilling is row:
                    self.prefilling = None
                row.table_len = len(row.blocks)  # the runner wrote its slot's table
                self._admissions += 1
                row.admitted = self._admissions
                self.live.append(row)

    def reject(self, batch: PrefillBatch, error: BaseException) -> None:
        """The batch's prefill failed (a prompt the model refused): its groups fail, nothing else."""
        for group in {row.group for row in batch.rows}:
            self.fail_group(group, error)
        for row in batch.rows:
            if self.prefilling is row:
                self.prefilling = None
            self._release(row)
            self.finish(row)

    def _release(self, row: SlotRow) -> None:
        """Give back the blocks of a row that will not decode (nothing of it is registered past what ran)."""
        self.pool.give_back(row.blocks)
        row.blocks = []

    # ---- decoding ---------------------------------------------------------------------------------

    def schedule_decode(self) -> DecodeBatch | None:
        """The decode step over every live row (None: nothing to do), each row with a block for the
        position it writes. Rows take blocks oldest first; where none are left, the youngest live
        row is preempted (`_preempt`) until they fit (a lone row always fits: `check`)."""
        moves: list[SlotMove] = []
        for row in sorted(self.live, key=lambda r: r.admitted):
            while row in self.live and not self._grow(row, row.cache_len + 1, 0):
                moves.append(self._preempt(max(self.live, key=lambda r: r.admitted)))
        # The table entries the device does not have yet, named by the slots after the moves.
        grown = []
        for slot, row in enumerate(self.live):
            grown += [BlockGrant(slot, i, row.blocks[i]) for i in range(row.table_len, len(row.blocks))]
            row.table_len = len(row.blocks)
        live = len(self.live)
        if live == 0:
            return DecodeBatch([], 0, 0, False, False, moves, grown) if moves else None
        bucket = next(b for b in self.buckets if b >= live)
        needed = max(row.cache_len for row in self.live) + 1
        span = min(self.max_len, max(self.min_length_bucket, 1 << (needed - 1).bit_length()))
        sampled = any(not row.request.sampling.greedy for row in self.live)
        logprobs = any(row.request.sampling.logprobs is not None for row in self.live)
        return DecodeBatch(list(self.live), bucket, span, sampled, logprobs, moves, grown)

    def _preempt(self, row: SlotRow) -> SlotMove:
        """Take `row` off its slot and give its blocks back; it waits at the head of the queue and its
        prefill later recomputes its prompt and output so far (vLLM's recompute preemption)."""
        slot = self.live.index(row)
        move = self._vacate(slot)
        self._release(row)  # its registered blocks stay cached: its own prefill may find them again
        row.prefilled, row.cache_len, row.table_len = 0, 0, 0
        row.incarnation += 1
        row.resume_ids = [*row.request.input_ids, *row.output_ids]
        self.waiting.appendleft(row)
        self.preemptions += 1
        logger.warning("KV cache full: preempted a request after %d tokens; it resumes when blocks free up",
                       row.generated)
        return move

    def _vacate(self, slot: int) -> SlotMove:
        """Empty `slot`, moving the last live row into it (so the live rows keep slots 0..n-1)."""
        last = len(self.live) - 1
        self.live[slot] = self.live[last]
        self.live.pop()
        return SlotMove(slot, last)

    def launched(self, batch: DecodeBatch) -> None:
        """The step was launched: each of its rows will have one more token cached."""
        for row in batch.rows:
            row.cache_len += 1

    def postprocess(self, rows: list[SlotRow], incarnations: list[int], tokens: list[int],
                    eos_ids: frozenset[int], logprobs: list | None = None) -> StepResult:
        """Advance each row by its token of one step, with its logprob entry where the step has them
        (rows finished earlier skip theirs: a step launched before their end was known; so do rows
        preempted since the step was launched). A row whose token broke its grammar fails alone."""
        outputs: dict[Group, list[StepOutput]] = {}
        ended: list[SlotRow] = []
        advanced = 0
        for i, (row, incarnation, token) in enumerate(zip(rows, incarnations, tokens)):
            if row.done or row.incarnation != incarnation:
                continue
            row.output_ids.append(token)
            # Blocks its launched steps filled with tokens known now: prompt and output so far.
            self._register(row, min(row.cache_len, len(row.request.input_ids) + len(row.output_ids)))
            chunk = row.advance(token, eos_ids, None if logprobs is None else logprobs[i])
            chunk = row.take_error() or chunk
            advanced += 1
            if chunk is not None and not row.group.failed:
                outputs.setdefault(row.group, [None] * len(row.group.rows))[row.index] = chunk
            if row.done:
                ended.append(row)
        return StepResult(outputs, ended, advanced)

    def release_finished(self) -> list[SlotMove]:
        """Free the slots and blocks of finished rows, keeping the live ones in slots 0..n-1; returns
        the moves, in the order the runner must apply them to its state."""
        moves: list[SlotMove] = []
        for slot in reversed(range(len(self.live))):
            row = self.live[slot]
            if not row.done:
                continue
            # A step launched before its end was known may still write into its last block: that step
            # runs before anything queued after it on the device, a later prefill into the block too
            # (and the block is registered only once that write's token is known: `postprocess`).
            self._release(row)
            moves.append(self._vacate(slot))
        return moves

    # ---- completion and failure -------------------------------------------------------------------

    def finish(self, row: SlotRow) -> None:
        """Count a finished row off its group (once); the last one completes the group's future."""
        row.done = True
        if row.closed:
            return
        row.closed = True
        group = row.group
        group.open_rows -= 1
        if group.open_rows == 0 and not group.future.done():
            group.future.set_result(None)

    @staticmethod
    def fail_group(group: Group, error: BaseException) -> None:
        """Fail the group's future; its rows stop (live ones are freed by the next `release_finished`)."""
        if not group.future.done():
            group.future.set_exception(error)
        group.failed = True
        for row in group.rows:
            row.done = True

    def fail_all(self, error: BaseException) -> None:
        """Every request in flight fails with `error`, waiting or live; no slot or block stays taken."""
        rows = [*self.live, *self.waiting, *([self.prefilling] if self.prefilling else [])]
        for row in rows:
            self.fail_group(row.group, error)
            row.blocks = []
        self.waiting.clear()
        self.live.clear()
        self.prefilling = None
        self.pool.reset()
