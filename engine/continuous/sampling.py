"""Sampling every row of a step at once, on the device, without host synchronisation.

The generate() engine samples row by row with `torch.multinomial` and a `torch.Generator` per row:
a loop on the host, and a generator's state lives outside any CUDA graph. Here all rows are
sampled by one set of tensor operations whose randomness is a pure function of (row key, index
of the token in the row's output, token id):

- per row, in transformers' order (`process`): the repetition penalty over the row's seen tokens,
  end-of-sequence suppression, the row's grammar mask (a bitmask, all ones for rows without one);
  then (`choose`) greedy (the argmax, exactly as the generate() engine), or temperature, top_k and
  top_p. Logprobs are read off `process`'s logits (engine/logprobs.py says why there);
- sampled rows draw with the exponential race: argmax(p_i / E_i), E_i ~ Exp(1) i.i.d., picks token
  i with probability p_i (the Gumbel-max trick in another form), so it needs only uniforms;
- the uniforms come from an integer hash of (key, counter, token id), so a seeded request gives
  the same tokens whatever else shares the step, on a CPU or inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so every product of a 32-bit value stays below 2**63 (no int64 overflow).
_MIX = 0x45D9F3B
_GOLDEN = 0x4F1BBCDD


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Mueller's), on int64 tensors holding values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def uniforms(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) floats of shape [rows, vocab], a function of each row's key and counter only."""
    key = mix32(mix32(seed & _MASK32) ^ (counter & _MASK32))  # [rows]
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    bits = mix32((key[:, None] + ids[None, :] * _GOLDEN) & _MASK32)
    # 24 random bits fill a float32 mantissa; +0.5 keeps the value strictly inside (0, 1).
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class RowParams:
    """Per-row sampling parameters as device tensors (one entry per row of the logits)."""

    temperature: torch.Tensor  # float32; 0 for greedy rows
    top_p: torch.Tensor  # float32
    seed: torch.Tensor  # int64 in [0, 2**32): the row's key (engine/continuous/runner.py `seed_key`)
    counter: torch.Tensor  # int64: tokens this row has sampled before this one
    suppress_eos: torch.Tensor  # bool: min_tokens not reached, or ignore_eos
    top_k: torch.Tensor | None = None  # int64; 0 (or None for every row): off
    penalty: torch.Tensor | None = None  # float32 repetition penalty; 1 (or None for every row): off
    seen: torch.Tensor | None = None  # bool [rows, vocab]: the row's prompt and output tokens
    # int32 [rows, ceil(vocab / 32)]: bit j of word j // 32 set where token j is allowed (xgrammar's
    # bitmask layout; all ones for a row without a grammar); None: every token for every row.
    allowed: torch.Tensor | None = None


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty, every row at once: each seen token's logit divided by the
    row's penalty where positive, multiplied by it where negative. Exact where the penalty is 1."""
    penalized = torch.where(logits < 0, logits * penalty[:, None], logits / penalty[:, None])
    return torch.where(seen, penalized, logits)


def unpack_bitmask(allowed: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [rows, vocab] from a bitmask int32 [rows, ceil(vocab / 32)] (bit j % 32 of word j // 32)."""
    ids = torch.arange(vocab, device=allowed.device)
    words = allowed.index_select(1, ids >> 5)
    return ((words >> (ids & 31)) & 1).bool()


def process(logits: torch.Tensor, params: RowParams, eos_mask: torch.Tensor) -> torch.Tensor:
    """The logits the sampler chooses from, float32: penalized, end-of-sequence suppressed where the
    row must go on, masked to the row's grammar."""
    logits = logits.float()
    if params.penalty is not None and params.seen is not None:
        logits = penalize(logits, params.seen, params.penalty)
    logits = logits.masked_fill(params.suppress_eos[:, None] & eos_mask[None, :], float("-inf"))
    if params.allowed is not None:
        logits = logits.masked_fill(~unpack_bitmask(params.allowed, logits.shape[-1]), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: RowParams, eos_mask: torch.Tensor, any_sampled: bool) -> torch.Tensor:
    """Next token per row from `logits` [rows, vocab]. `eos_mask` [vocab] marks end-of-sequence ids."""
    return choose(process(logits, params, eos_mask), params, any_sampled)


def choose(logits: torch.Tensor, params: RowParams, any_sampled: bool) -> torch.Tensor:
    """Next token per row from processed `logits` (`process`).

    `any_sampled=False` (every row greedy) skips the sampling work entirely; it is a Python flag so
    a compiled or captured step has one variant for each case rather than a branch on the device.
    """
    greedy = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy
    is_greedy = params.temperature <= 0
    temperature = torch.where(is_greedy, torch.ones_like(params.temperature), params.temperature)
    # Shifted so each row's largest logit is 0: the same distribution, and a temperature too small
    # to divide by gives the greedy limit rather than NaN probabilities.
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(shifted / temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = torch.zeros_like(sorted_probs, dtype=torch.bool)
    if params.top_k is not None:
        # The k most likely tokens, and any tied with the k-th (as transformers keeps them); 0: all.
        kth = sorted_probs.gather(1, (params.top_k - 1).clamp(min=0, max=logits.shape[-1] - 1)[:, None])
        outside = (sorted_probs < kth) & (params.top_k[:, None] > 0)
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)  # top_p reads what top_k kept
    # Keep the smallest set of tokens whose mass reaches top_p (always at least the first), as the
    # generate() engine does; top_p == 1 keeps everything, including tokens past float rounding.
    outside |= (sorted_probs.cumsum(-1) - sorted_probs >= params.top_p[:, None]) & (params.top_p[:, None] < 1.0)
    keep = torch.zeros_like(outside).scatter(1, order, ~outside)
    race = -torch.log(uniforms(params.seed, params.counter, logits.shape[-1]))
    sampled = torch.where(keep, probs / race, torch.zeros_like(probs)).argmax(dim=-1)
    return torch.where(is_greedy, greedy, sampled)
