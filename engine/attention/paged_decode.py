"""Attention of one new token per row over that row's blocks of the paged KV cache.

The decode step calls one `PagedDecodeAttention` per layer. Two implementations:
- `GatherAttention` (any device): the rows' blocks gathered into one tensor, then PyTorch's SDPA
  with a length mask. Simple and exact, but the gather writes, and SDPA reads again, as many bytes
  as the keys and values read: on a GPU, where a decode step is bound by memory traffic, that costs.
- `TritonPagedAttention` (CUDA, engine/attention/triton_decode.py): reads each row's keys and
  values once, straight from its blocks (split-KV "flash decoding": several programs per row and
  key/value head, combined by their log-sum-exp).
`decode_attention(kind, device)` picks one from the `decode_attention` setting.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class PagedDecodeAttention(Protocol):
    def __call__(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, table: torch.Tensor,
                 lengths: torch.Tensor, span: int, scale: float) -> torch.Tensor:
        """Attention output [rows, kv_heads, groups, head_dim] for queries `q` of the same shape.

        Row r's query attends over positions 0..lengths[r] of its sequence (its new token's key and
        value already written), position p at cache_k[table[r, p // block_size], p % block_size]
        (cache [num_blocks, block_size, kv_heads, head_dim]). `span` (a multiple of the block size,
        above every live row's length) bounds the positions read; rows whose length reaches past it
        are not live and get any finite output. Query head g of kv head h is head h * groups + g,
        as transformers' repeat_kv arranges them. Must be capturable in a CUDA graph and traceable
        by torch.compile (no host reads).
        """
        ...


class GatherAttention:
    """SDPA over the rows' gathered blocks (see the module docstring)."""

    def __call__(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, table: torch.Tensor,
                 lengths: torch.Tensor, span: int, scale: float) -> torch.Tensor:
        block_size = cache_k.shape[1]
        context = table[:, :span // block_size]
        visible = (torch.arange(span, device=q.device)[None, :] <= lengths[:, None])[:, None, None, :]
        # The query heads that share a key/value head become that head's "query positions": grouped-query
        # attention without repeating the cache.
        return F.scaled_dot_product_attention(q, gather(cache_k, context), gather(cache_v, context),
                                              attn_mask=visible, scale=scale)


def gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Rows' cached keys or values, heads first: [rows, kv_heads, n * block_size, head_dim] for
    `blocks` [rows, n]. The gather is one copy; the heads-first view of it is free (the cache's layout
    is tokens, then heads)."""
    rows, count = blocks.shape
    _, block_size, kv_heads, head_dim = cache.shape
    return cache[blocks].view(rows, count * block_size, kv_heads, head_dim).transpose(1, 2)


def decode_attention(kind: str, device: torch.device) -> PagedDecodeAttention:
    """The implementation the `decode_attention` setting names; "auto": Triton on CUDA, else gather."""
    if kind == "auto":
        kind = "triton" if device.type == "cuda" else "gather"
    if kind == "gather":
        return GatherAttention()
    if device.type != "cuda":
        raise ValueError("decode_attention 'triton' needs a CUDA device")
    from engine.attention.triton_decode import TritonPagedAttention  # Triton is there only with CUDA

    return TritonPagedAttention()
