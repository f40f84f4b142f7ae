"""One row's grammar state, and the token bitmask that carries every constrained row's next step.

Per step, an engine (1) fills the bitmask rows of the constrained rows that are still live
(`fill_bitmask`, on the host), (2) masks those rows of the step's logits (`apply_bitmask`, on the
logits' device) before penalties, temperature and sampling read them, and (3) hands each sampled
token to the row (`RowState.advance` calls `RowMatcher.accept`). A step's mask depends on the token
sampled at the step before, so a constrained row's step cannot be launched before that token is
read.

The bitmask is xgrammar's: int32 [rows, ceil(vocab / 32)] on the host, bit j of a row set where
token j is allowed. It must span the model's whole vocabulary (the lm_head's width, which may exceed
the tokenizer's), as `GrammarCompiler.vocab_size` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import xgrammar as xgr


class RowMatcher:
    """Where one row stands in its compiled grammar; made by `GrammarCompiler.matcher`."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False (and no change) where the grammar does not allow it here.
        An end-of-sequence token is accepted where the grammar may end, and terminates it."""
        return self._matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """Whether the grammar has ended (it accepted end-of-sequence after a complete output)."""
        return self._matcher.is_terminated()


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A host bitmask for `rows` rows over `vocab_size` tokens, every token allowed."""
    return xgr.allocate_token_bitmask(rows, vocab_size)


def fill_bitmask(bitmask: torch.Tensor, matchers: Sequence[RowMatcher], rows: Sequence[int]) -> None:
    """Write into `bitmask[rows[i]]` the tokens `matchers[i]` allows next, for every i at once (xgrammar
    spreads the rows over its threads). Only for matchers that are not terminated."""
    if matchers:
        _batch_matcher().batch_fill_next_token_bitmask([m._matcher for m in matchers], bitmask, list(rows))


@cache
def _batch_matcher() -> xgr.BatchGrammarMatcher:
    return xgr.BatchGrammarMatcher()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Set to -inf, in place, the logits of the tokens each of `rows` may not take next.

    `logits` [n, vocab] on the CPU or a GPU (float32, bfloat16 or float16); `bitmask` the host
    bitmask whose first n rows line up with the logits' rows, filled for each of `rows`. The other
    rows of the logits (unconstrained, or not filled this step) are left as they are. On a GPU the
    first n rows of the bitmask are copied over first (n * vocab / 8 bytes: 19 KB per row for a
    150k vocabulary), then xgrammar's Triton kernel masks them.
    """
    if not rows:
        return
    mask = bitmask[: logits.shape[0]].to(logits.device)
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[-1], indices=list(rows))
