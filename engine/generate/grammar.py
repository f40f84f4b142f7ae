"""GrammarMask: the generate() engine's grammar step, a logits processor ahead of `RowSampler`.

At each step of `generate()` it fills the bitmask rows of the live rows that have a grammar (from
each row's `RowMatcher`, which `RowState.advance` moved past the previous token) and masks those
rows' logits in place, so the sampler, and the logprobs it reports, see only what the grammar allows.
Rows without a grammar are left untouched.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from engine.grammar.matcher import allocate_bitmask, apply_bitmask, fill_bitmask
from engine.rows import RowState


class GrammarMask(LogitsProcessor):
    """Masks each constrained row's logits to the tokens its grammar allows next."""

    def __init__(self, rows: list[RowState], vocab_size: int) -> None:
        self._rows = rows
        self._bitmask = allocate_bitmask(len(rows), vocab_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        constrained = [i for i, row in enumerate(self._rows) if row.grammar is not None and not row.done]
        fill_bitmask(self._bitmask, [self._rows[i].grammar for i in constrained], constrained)
        apply_bitmask(scores, self._bitmask, constrained)
        return scores
