"""Log-probabilities of sampled tokens and their most likely alternatives, for both engines.

Which distribution: the one the sampler drew from, before its temperature, top_k and top_p: the
model's logits after the repetition penalty, end-of-sequence suppression and the grammar mask,
through a log-softmax. So
- a token's logprob does not depend on the temperature (as OpenAI's do, and vLLM's by default),
  and a greedy request (temperature 0) gets the model's numbers, not 0 and -inf;
- the penalty and the mask are in: a grammar's forbidden tokens never appear among the
  alternatives, and the sampled token's logprob is finite, from the logits that chose it.

Two halves, so an engine can keep the device work inside its step:
- `step_logprobs`, on the logits' device: one log-softmax, gather and top-k for all rows of a step;
- `TokenTexts.entries`, on the host: the values read back at once and turned into `TokenLogprob`s,
  with each token's text (cached) and its exact bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serve_app.stage_types import TokenLogprob, TopLogprob

MAX_TOP = 20  # the most alternatives a request may ask for (OpenAI's top_logprobs limit)


@dataclass
class StepLogprobs:
    """One step's log-probabilities for the rows that asked, on the logits' device."""

    chosen: torch.Tensor  # float32 [rows]: each row's sampled token's
    top_ids: torch.Tensor  # int64 [rows, k]: the k most likely tokens, most likely first
    top_logprobs: torch.Tensor  # float32 [rows, k]: theirs


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> StepLogprobs:
    """Log-probabilities from a step's processed `logits` [rows, vocab] (what the sampler read, before
    its temperature): of each row's sampled token (`tokens` [rows], on the same device) and of its
    `k` most likely tokens (`k`: the most any of these rows asked for, 0..MAX_TOP)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    return StepLogprobs(logprobs.gather(1, tokens.view(-1, 1)).squeeze(1), top.indices, top.values)


class TokenTexts:
    """Token ids as `TokenLogprob`s: each token's text as the tokenizer decodes it alone (cached),
    and its exact bytes, which may be part of a UTF-8 character (its text then holds U+FFFD)."""

    def __init__(self, tokenizer, token_bytes: Sequence[bytes]) -> None:
        """`token_bytes[i]`: token i's bytes (`GrammarCompiler.token_bytes`, xgrammar's decoded vocabulary)."""
        self._tokenizer = tokenizer
        self._bytes = token_bytes
        self._texts: dict[int, str] = {}

    def text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._tokenizer.decode([token])
        return text

    def bytes(self, token: int) -> tuple[int, ...]:
        return tuple(self._bytes[token]) if token < len(self._bytes) else ()

    def entries(self, step: StepLogprobs, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
        """One `TokenLogprob` per row of `step`: `tokens[i]` is row i's sampled token, `top[i]` how many
        alternatives it asked for. Alternatives the row could not take (a logprob of -inf: masked by its
        grammar or suppressed) are left out, so a row may get fewer than it asked for."""
        chosen, ids, values = step.chosen.tolist(), step.top_ids.tolist(), step.top_logprobs.tolist()
        return [
            TokenLogprob(
                token=self.text(token),
                logprob=chosen[row],
                bytes=self.bytes(token),
                top=tuple(TopLogprob(self.text(t), v, self.bytes(t))
                          for t, v in zip(ids[row][: top[row]], values[row][: top[row]]) if not math.isinf(v)),
            )
            for row, token in enumerate(tokens)
        ]
