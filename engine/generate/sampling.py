"""Sampling for the generate() engine: every row of a batch with its own parameters, row by row.

`RowSampler` is a logits processor: `generate()` calls it once per step with the whole batch's
next-token logits, and it returns scores whose argmax is each row's own choice (a one-hot), so that
`generate()` itself runs greedy and each row behaves as if it ran alone. Per row, in transformers'
order: the repetition penalty over the row's prompt and output tokens, end-of-sequence suppression
(`RowState.suppresses_eos`), then greedy, or temperature, top_k, top_p and a draw from the row's own
seeded generator. The grammar mask came before (engine/generate/grammar.py). A row whose
parameters cannot be used fails alone (`RowState.fail`): the batch's other rows go on.

The rows that asked for logprobs get them from the logits each was sampled from, before its
temperature (engine/logprobs.py), all rows of the step in one set of tensor operations; the
sampler keeps them in `logprobs` for the step's `RowState.advance`.
"""

from __future__ import annotations

import logging

import torch
from transformers import LogitsProcessor

from engine.logprobs import TokenTexts, step_logprobs
from engine.rows import RowState
from serve_app.stage_types import SamplingParams, TokenLogprob

logger = logging.getLogger("ray.serve")


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on one row's `logits` [vocab]: every token id in `seen` has its
    logit divided by `penalty` where positive and multiplied by it where negative (1.0: unchanged)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    return logits.scatter(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id (a 0-d tensor) drawn from `logits` [vocab] with temperature, top_k and top_p.

    The logits are shifted so their largest is 0 before they are divided by the temperature: the
    same distribution, and a temperature too small to divide by gives the greedy limit (the largest
    logit stays finite, the others go to -inf) instead of NaN probabilities. In float64, where every
    positive temperature a request can carry is a positive number.
    """
    scaled = (logits.double() - logits.max()) / params.temperature
    if 0 < params.top_k < scaled.numel():  # as transformers: ties with the k-th largest stay in
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least the first).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return order[torch.multinomial(sorted_probs, 1, generator=generator)][0]
    return torch.multinomial(probs, 1, generator=generator)[0]


class RowSampler(LogitsProcessor):
    """Samples each row with its own parameters; returns scores whose argmax is the sampled token."""

    def __init__(self, rows: list[RowState], starts: list[int], eos_ids: frozenset[int], device: torch.device,
                 texts: TokenTexts | None) -> None:
        """`starts[i]`: the column of row i's first prompt token in `generate()`'s (left-padded) ids;
        `texts`: what turns logprobs into entries (needed only where a row asks for logprobs)."""
        self._rows = rows
        self._starts = starts
        self._eos = torch.tensor(sorted(eos_ids), device=device)
        self._texts = texts
        self._generators: list[torch.Generator | None] = [self._generator(row, device) for row in rows]
        # The last step's, one per row: None where the row did not ask (or was not sampled).
        self.logprobs: list[TokenLogprob | None] = [None] * len(rows)

    @staticmethod
    def _generator(row: RowState, device: torch.device) -> torch.Generator | None:
        params = row.request.sampling
        if params.greedy:
            return None
        try:
            generator = torch.Generator(device=device)
            if params.seed is not None:
                # Each of a request's n choices its own stream; the first the seed's alone.
                choice = getattr(row.request, "choice", 0)
                generator.manual_seed(params.seed if not choice else hash((params.seed, choice)) & (2**63 - 1))
            else:
                generator.seed()
            return generator
        except Exception as error:  # noqa: BLE001 - e.g. a seed beyond 64 bits: this row fails, the others run
            logger.warning("A request's sampling could not start (%s: %s); it fails alone", type(error).__name__, error)
            row.fail(error)
            return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        chosen = scores.argmax(dim=-1)  # what rows that are done get: ignored, as generate() pads them
        processed = scores.clone()  # each row's logits as its sampler read them, for its logprobs
        for i, row in enumerate(self._rows):
            if row.done:
                continue
            try:
                processed[i] = self._process(row, scores[i], input_ids[i, self._starts[i]:])
                chosen[i] = self._choose(row.request.sampling, processed[i], self._generators[i])
            except Exception as error:  # noqa: BLE001 - this row's values broke its sampling: it alone fails
                logger.warning("Sampling failed for a request (%s: %s); it fails alone", type(error).__name__, error)
                row.fail(error)
        self._keep_logprobs(processed, chosen)
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot.scatter_(1, chosen[:, None], 0.0)
        return one_hot

    def _process(self, row: RowState, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The row's logits as its sampler reads them: penalised, end-of-sequence suppressed where it must be."""
        logits = penalize(logits, tokens, row.request.sampling.repetition_penalty)
        if row.suppresses_eos:
            logits = logits.index_fill(0, self._eos, float("-inf"))
        return logits

    @staticmethod
    def _choose(params: SamplingParams, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if params.greedy:
            return logits.argmax()
        return sample(logits, params, generator)

    def _keep_logprobs(self, processed: torch.Tensor, chosen: torch.Tensor) -> None:
        """This step's logprobs of the rows that asked, computed for all of them at once."""
        self.logprobs = [None] * len(self._rows)
        asking = [i for i, row in enumerate(self._rows) if not row.done and row.request.sampling.logprobs is not None]
        if not asking:
            return
        index = torch.tensor(asking, device=processed.device)
        top = [self._rows[i].request.sampling.logprobs for i in asking]
        step = step_logprobs(processed[index], chosen[index], max(top))
        for i, entry in zip(asking, self._texts.entries(step, chosen[index].tolist(), top)):
            self.logprobs[i] = entry
