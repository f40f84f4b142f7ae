"""The paged KV cache and per-slot decoding state, all on the device.

A slot holds one decoding sequence: its block table (where its keys and values are in the paged
cache), how many tokens it has cached, its rotary delta and its sampling parameters. Active
sequences always occupy slots 0..n-1 (a finished sequence's slot is refilled by moving the last one
into it: its table row and state, never its keys and values), so a decode step over the first B
slots covers every active sequence, and B can be rounded up to a bucket whose CUDA graph is
already captured.

Everything a decode step reads or writes lives in the tensors made here, at fixed addresses, so
a step captured once in a CUDA graph stays valid for every later replay.
"""

from __future__ import annotations

import torch

from engine.attention.kv_format import KV_FORMATS, KVFormat, LayerCache
from engine.logprobs import MAX_TOP


class PagedKVCache:
    """Every layer's keys and values in blocks of `block_size` positions, in a `KVFormat`
    (engine/attention/kv_format.py: the model's dtype, or int8 codes with a scale per position and
    head). `layers[i]` is layer i's cache, a NamedTuple of tensors that the decoder's layers take and
    hand to `kv_format.store`/`load` and the decode attention.

    One tensor per layer and kind (not one big tensor) so the steps' in-place writes are on whole
    tensors: torch.compile keeps those in place, where a write into a view of a larger tensor may be
    turned into a copy of all of it.
    """

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, kv_format: KVFormat = KV_FORMATS["none"]) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.format = kv_format
        self.layers: list[LayerCache] = [kv_format.allocate(num_blocks, block_size, kv_heads, head_dim, dtype, device)
                                         for _ in range(layers)]
        for tensor in self._tensors():
            torch._dynamo.mark_static_address(tensor)
            # Static sizes too: they never change, and a compiled layer that took a size as a symbol
            # could specialise on it meeting another size (dynamo's duck sizing) and compile again.
            torch._dynamo.mark_static(tensor)

    @staticmethod
    def block_bytes(layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    kv_format: KVFormat = KV_FORMATS["none"]) -> int:
        """Bytes one block takes over every layer, keys and values, scales included."""
        return layers * block_size * kv_format.token_bytes(kv_heads, head_dim, dtype)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def copy_blocks(self, source: list[int], target: list[int]) -> None:
        """Every layer's keys and values (and their scales) of blocks `source` into blocks `target` (pairwise)."""
        if not source:
            return
        device = self.layers[0].keys.device
        src = torch.tensor(source, dtype=torch.long).to(device, non_blocking=True)
        dst = torch.tensor(target, dtype=torch.long).to(device, non_blocking=True)
        for cache in self._tensors():
            cache[dst] = cache[src]

    def _tensors(self) -> list[torch.Tensor]:
        return [tensor for layer in self.layers for tensor in layer]


class SlotState:
    """Per-slot values on the device: what the next decode step needs, and what it updates."""

    def __init__(self, slots: int, vocab: int, max_blocks: int, device: torch.device) -> None:

        def make(dtype: torch.dtype, fill: float | bool = 0, width: int | None = None) -> torch.Tensor:
            tensor = torch.full((slots,) if width is None else (slots, width), fill, dtype=dtype, device=device)
            torch._dynamo.mark_static_address(tensor)
            return tensor

        self.last_token = make(torch.long)  # the input of the next step
        self.length = make(torch.long)  # tokens in the cache = where the next token's K/V goes
        self.rope_delta = make(torch.long)  # mrope position = length + rope_delta after the prompt
        self.generated = make(torch.long)  # tokens sampled so far (min_tokens, the RNG counter)
        self.active = make(torch.bool, False)
        self.min_tokens = make(torch.long)
        self.ignore_eos = make(torch.bool, False)
        self.temperature = make(torch.float32)  # 0: greedy
        self.top_p = make(torch.float32, 1.0)
        self.top_k = make(torch.long)  # 0: off
        self.penalty = make(torch.float32, 1.0)  # repetition penalty, 1: off
        self.seed = make(torch.long)  # the sampler's 32-bit key
        # Token ids in the slot's prompt or output, for the repetition penalty (one row per slot: a
        # fixed shape that a captured step can update in place).
        self.seen = make(torch.bool, False, width=vocab)
        self.next_token = make(torch.long)  # the step's output, read by the host
        # The slot's blocks in sequence order; 0 (the scratch block) past its end and in free slots.
        self.block_table = make(torch.long, 0, width=max_blocks)
        torch._dynamo.mark_static(self.block_table)
        # The tokens the slot's grammar allows next, as a bitmask (sampling.py); all ones without one.
        self.allowed = make(torch.int32, -1, width=(vocab + 31) // 32)
        # The step's logprobs, where it computes them (engine/logprobs.py): the sampled token's, and the
        # MAX_TOP most likely tokens with theirs.
        self.chosen_logprob = make(torch.float32)
        self.top_ids = make(torch.long, width=MAX_TOP)
        self.top_logprobs = make(torch.float32, width=MAX_TOP)
        self._all = [self.block_table, self.allowed, self.last_token, self.length, self.rope_delta, self.generated, self.active, self.min_tokens,
                     self.ignore_eos, self.temperature, self.top_p, self.top_k, self.penalty, self.seed, self.seen,
                     self.next_token]

    def move(self, src: int, dst: int) -> None:
        for tensor in self._all:
            tensor[dst] = tensor[src]

    def clear(self, slot: int) -> None:
        self.active[slot] = False
        self.length[slot] = 0
        self.block_table[slot] = 0
        self.allowed[slot] = -1

    @staticmethod
    def mark_seen(seen: torch.Tensor, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Add each active row's token to its row of `seen` (a view of rows of `self.seen`), in place;
        inactive rows keep theirs (their slot may be a live one paused for a graph capture)."""
        index = tokens[:, None]
        seen.scatter_(1, index, seen.gather(1, index) | active[:, None])
