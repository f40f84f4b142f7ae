"""Scheduler: which sequences the continuous engine runs at each step. Bookkeeping only, no tensors.

The engine's loop asks it, every iteration:
1. `schedule_prefill`: which waiting requests to admit now. Oldest first, as many as there are free
   slots and as fit the prefill budget (`max_prefill_tokens` of padded prompt; always at least one),
   after dropping those whose client went away. Admitted rows take the slots after the live ones;
   `admit` (prefilled) or `reject` (the prefill failed) settles them.
2. `schedule_decode`: the decode step over every live row: the batch bucket it runs at (the
   smallest captured size that holds them all), the cache span attention reads (a power of two
   above the longest sequence, at least `min_length_bucket`), and whether any row samples.
3. `postprocess`: one step's sampled tokens, one per row of that step, advanced row by row
   (`RowState.advance`: text, stops, limits, cancellation), gathered per group for the callbacks.
4. `release_finished`: frees the slots of finished rows, moving the last live row into each hole so
   the live rows always hold slots 0..n-1 (a decode step over the first B slots covers them all).
A group (one `submit` call) completes when all its rows are finished; a failure fails its group.

Not thread-safe: the engine calls it from its loop, and `add` / `schedule_prefill` / `fail_all`
under the engine's lock, since requests arrive from other threads.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.detokenizer import Detokenizer
from engine.protocol import StepCallback, StepOutput
from engine.rows import RowState

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
        if not batch:
            group.future.set_result(None)
        return group


@dataclass(eq=False)
class SlotRow(RowState):
    """A request in the continuous engine: its row state, its group, and its slot's cache length."""

    group: Group | None = None
    index: int = 0  # position in its group (where its entries go in the callback's list)
    cache_len: int = 0  # tokens in its slot once every launched step has run
    closed: bool = False  # counted off its group


@dataclass
class PrefillBatch:
    """Rows to prefill into slots first_slot, first_slot + 1, ... (in this order)."""

    rows: list[SlotRow]
    first_slot: int


@dataclass
class DecodeBatch:
    """One decode step: output i belongs to rows[i], the row in slot i."""

    rows: list[SlotRow]
    bucket: int  # slots the step runs over (inactive ones padded in): a captured batch size
    span: int  # cache positions attention reads
    sampled: bool  # any row samples (else the all-greedy variant of the step runs)


@dataclass(frozen=True)
class SlotMove:
    """Freeing `slot`: the last live slot, `source`, moves into it (nothing moves when source == slot),
    its first `length` cache positions copied; `source` is then empty."""

    slot: int
    source: int
    length: int


@dataclass
class StepResult:
    """What one step's tokens did: each group's callback entries, and the rows that ended."""

    outputs: dict[Group, list[StepOutput]]
    ended: list[SlotRow]
    tokens: int  # rows advanced


class Scheduler:
    def __init__(self, slots: int, max_len: int, max_prefill_tokens: int, buckets: list[int],
                 min_length_bucket: int) -> None:
        self.slots = slots
        self.max_len = max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.buckets = sorted({b for b in buckets if b < slots} | {slots})
        self.min_length_bucket = min_length_bucket
        self.waiting: deque[SlotRow] = deque()
        self.live: list[SlotRow] = []  # index = slot

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.live)

    # ---- arrivals ---------------------------------------------------------------------------------

    def check(self, request) -> None:
        """Raises ValueError when `request` can never fit a slot."""
        if request.prompt_tokens + request.max_tokens > self.max_len:
            raise ValueError(f"{request.prompt_tokens} prompt + {request.max_tokens} new tokens do not fit a "
                             f"{self.max_len}-token slot")

    def add(self, group: Group) -> None:
        self.waiting.extend(group.rows)

    def schedule_prefill(self) -> PrefillBatch | None:
        """The waiting rows to prefill now (see the module docstring), taken off the queue."""
        self._drop_abandoned()
        taken: list[SlotRow] = []
        width = 0
        while self.waiting and len(self.live) + len(taken) < self.slots:
            wider = max(width, self.waiting[0].request.prompt_tokens)
            if taken and wider * (len(taken) + 1) > self.max_prefill_tokens:
                break
            width = wider
            taken.append(self.waiting.popleft())
        return PrefillBatch(taken, len(self.live)) if taken else None

    def _drop_abandoned(self) -> None:
        """Forget waiting rows whose client went away (or whose group failed) before they got a slot."""
        if not any(row.done or row.request.cancelled for row in self.waiting):
            return
        keep: deque[SlotRow] = deque()
        for row in self.waiting:
            if row.done or row.request.cancelled:
                if not row.done:
                    logger.info("Dropped a cancelled request from its batch after 0 tokens")
                self.finish(row)
            else:
                keep.append(row)
        self.waiting = keep

    def admit(self, batch: PrefillBatch) -> None:
        """The batch was prefilled into its slots: its rows are live, their prompts cached."""
        assert batch.first_slot == len(self.live), "rows are admitted into the slots after the live ones"
        for row in batch.rows:
            row.cache_len = row.request.prompt_tokens
            self.live.append(row)

    def reject(self, batch: PrefillBatch, error: BaseException) -> None:
        """The batch's prefill failed (a prompt the model refused): its groups fail, nothing else."""
        for group in {row.group for row in batch.rows}:
            self.fail_group(group, error)
        for row in batch.rows:
            self.finish(row)

    # ---- decoding ---------------------------------------------------------------------------------

    def schedule_decode(self) -> DecodeBatch | None:
        """The decode step over every live row (None: no row is live)."""
        live = len(self.live)
        if live == 0:
            return None
        bucket = next(b for b in self.buckets if b >= live)
        needed = max(row.cache_len for row in self.live) + 1
        span = min(self.max_len, max(self.min_length_bucket, 1 << (needed - 1).bit_length()))
        sampled = any(not row.request.sampling.greedy for row in self.live)
        return DecodeBatch(list(self.live), bucket, span, sampled)

    def launched(self, batch: DecodeBatch) -> None:
        """The step was launched: each of its rows will have one more token cached."""
        for row in batch.rows:
            row.cache_len += 1

    def postprocess(self, rows: list[SlotRow], tokens: list[int], eos_ids: frozenset[int]) -> StepResult:
        """Advance each row by its token of one step (rows finished earlier skip theirs: a step
        launched before their end was known)."""
        outputs: dict[Group, list[StepOutput]] = {}
        ended: list[SlotRow] = []
        advanced = 0
        for row, token in zip(rows, tokens):
            if row.done:
                continue
            chunk = row.advance(token, eos_ids)
            advanced += 1
            if chunk is not None and not row.group.failed:
                outputs.setdefault(row.group, [None] * len(row.group.rows))[row.index] = chunk
            if row.done:
                ended.append(row)
        return StepResult(outputs, ended, advanced)

    def release_finished(self) -> list[SlotMove]:
        """Free the slots of finished rows, keeping the live ones in slots 0..n-1; returns the moves,
        in the order the runner must apply them to its cache and state."""
        moves: list[SlotMove] = []
        for slot in reversed(range(len(self.live))):
            if not self.live[slot].done:
                continue
            last = len(self.live) - 1
            mover = self.live[last]
            # The launched steps have written up to cache_len positions of the mover's slot.
            moves.append(SlotMove(slot, last, min(mover.cache_len, self.max_len)))
            self.live[slot] = mover
            self.live.pop()
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
        """Every request in flight fails with `error`, waiting or live; no slot stays taken."""
        for row in [*self.live, *self.waiting]:
            self.fail_group(row.group, error)
        self.waiting.clear()
        self.live.clear()
