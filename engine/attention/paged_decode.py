"""Attention of one new token per row over that row's blocks of the paged KV cache.

The decode step calls one `PagedDecodeAttention` per layer. Two implementations:
- `GatherAttention` (any device): the rows' blocks gathered into one tensor (dequantized, from an
  int8 cache), then PyTorch's SDPA with a length mask. Simple and exact, but the gather writes, and
  SDPA reads again, as many bytes as the keys and values read: on a GPU, where a decode step is
  bound by memory traffic, that costs.
- `TritonPagedAttention` (CUDA, engine/attention/triton_decode.py): reads each row's keys and
  values once, straight from its blocks (split-KV "flash decoding": several programs per row and
  key/value head, combined by their log-sum-exp); from an int8 cache it reads the int8 codes and
  applies their scales inside the kernel.
`decode_attention(kind, device, kv_format)` picks one from the `decode_attention` setting.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from engine.attention.kv_format import KV_FORMATS, KVFormat, LayerCache


class PagedDecodeAttention(Protocol):
    def __call__(self, q: torch.Tensor, cache: LayerCache, table: torch.Tensor, lengths: torch.Tensor, span: int,
                 scale: float) -> torch.Tensor:
        """Attention output [rows, kv_heads, groups, head_dim] for queries `q` of the same shape.

        Row r's query attends over positions 0..lengths[r] of its sequence (its new token's key and
        value already written), position p at [table[r, p // block_size], p % block_size] of the
        layer's `cache` (engine/attention/kv_format.py, in the format the implementation was made
        for). `span` (a multiple of the block size, above every live row's length) bounds the
        positions read; rows whose length reaches past it are not live and get any finite output.
        Query head g of kv head h is head h * groups + g, as transformers' repeat_kv arranges them.
        Must be capturable in a CUDA graph and traceable by torch.compile (no host reads).
        """
        ...


class GatherAttention:
    """SDPA over the rows' gathered (and, from an int8 cache, dequantized) blocks (see the module docstring)."""

    def __init__(self, kv_format: KVFormat = KV_FORMATS["none"]) -> None:
        self.format = kv_format

    def __call__(self, q: torch.Tensor, cache: LayerCache, table: torch.Tensor, lengths: torch.Tensor, span: int,
                 scale: float) -> torch.Tensor:
        block_size = cache.keys.shape[1]
        keys, values = self.format.load(cache, table[:, :span // block_size], q.dtype)
        visible = (torch.arange(span, device=q.device)[None, :] <= lengths[:, None])[:, None, None, :]
        # The query heads that share a key/value head become that head's "query positions": grouped-query
        # attention without repeating the cache.
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale)


def decode_attention(kind: str, device: torch.device, kv_format: KVFormat = KV_FORMATS["none"]) -> PagedDecodeAttention:
    """The implementation the `decode_attention` setting names, over a cache in `kv_format`;
    "auto": Triton on CUDA, else gather."""
    if kind == "auto":
        kind = "triton" if device.type == "cuda" else "gather"
    if kind == "gather":
        return GatherAttention(kv_format)
    if device.type != "cuda":
        raise ValueError("decode_attention 'triton' needs a CUDA device")
    from engine.attention.triton_decode import TritonPagedAttention  # Triton is there only with CUDA

    return TritonPagedAttention(kv_format)
