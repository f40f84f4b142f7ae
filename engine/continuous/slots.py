"""The preallocated KV cache and per-slot decoding state, all on the device.

A slot holds one sequence: its keys and values, how many tokens it has cached, its rotary delta
and its sampling parameters. Active sequences always occupy slots 0..n-1 (a finished sequence's
slot is refilled by moving the last one into it), so a decode step over the first B slots covers
every active sequence, and B can be rounded up to a bucket whose CUDA graph is already captured.

Everything a decode step reads or writes lives in the tensors made here, at fixed addresses, so
a step captured once in a CUDA graph stays valid for every later replay.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Keys and values per layer, [slots, kv_heads, max_len, head_dim] each, in the model's dtype.

    One tensor per layer and kind (not one big tensor) so the decode step's in-place writes are on
    whole tensors: torch.compile keeps those in place, where a write into a view of a larger
    tensor may be turned into a copy of all of it.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.slots, self.max_len = slots, max_len
        # One spare position past max_len, never read: attention's span of the cache is then always a
        # strict prefix. A span of the whole tensor is a different case to torch.compile (contiguity),
        # which would compile the step twice more, minutes each on a GPU, the first time a sequence
        # grows that long.
        shape = (slots, kv_heads, max_len + 1, head_dim)
        # Zeros, not empty: inactive rows attend over these, and NaN garbage would make their (ignored)
        # outputs NaN, which is harmless but noisy in debugging.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        for tensor in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(tensor)
            # Static sizes too: they never change, and a compiled layer that took the slot count as
            # a symbol would specialise on rows == slots whenever its first batch fills the cache
            # (dynamo's duck sizing), compiling once more for every other batch size.
            torch._dynamo.mark_static(tensor)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot `src` into slot `dst`."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length].copy_(cache[src, :, :length])


class SlotState:
    """Per-slot values on the device: what the next decode step needs, and what it updates."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:

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
        self._all = [self.last_token, self.length, self.rope_delta, self.generated, self.active, self.min_tokens,
                     self.ignore_eos, self.temperature, self.top_p, self.top_k, self.penalty, self.seed, self.seen,
                     self.next_token]

    def move(self, src: int, dst: int) -> None:
        for tensor in self._all:
            tensor[dst] = tensor[src]

    def clear(self, slot: int) -> None:
        self.active[slot] = False
        self.length[slot] = 0

    @staticmethod
    def mark_seen(seen: torch.Tensor, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Add each active row's token to its row of `seen` (a view of rows of `self.seen`), in place;
        inactive rows keep theirs (their slot may be a live one paused for a graph capture)."""
        index = tokens[:, None]
        seen.scatter_(1, index, seen.gather(1, index) | active[:, None])
