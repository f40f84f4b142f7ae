"""Paged decode attention as Triton kernels: each key and value read once, straight from its block.

Split-KV decoding ("flash decoding", as FlashInfer's and SGLang's decode kernels do it): the program
for (row, key/value head, split) takes a range of the row's positions, computes the scores of the
head's whole group of query heads against them with one matrix product per tile (the group is the
product's M dimension, so GQA reads each key once for all its query heads), and keeps an online
softmax; a second kernel combines the splits by their log-sum-exp. The split count grows as rows
shrink, so a single row still spreads over the GPU.

From an int8 cache (engine/attention/kv_int8.py: codes, a scale per position and kv head) the same
kernel, compiled with INT8, reads the codes (half the bytes), converts them to the query's dtype
(exact: |code| <= 127), multiplies each position's scores by its key scale after the q.k product, and
each position's softmax weight by its value scale before the product with the value codes.

Written here rather than taken from a library: FlashInfer compiles its kernels with nvcc at first use
(minutes, on machines that may have no compiler) and its prebuilt wheels are gigabytes; these two
kernels are short, and registered as a torch custom op so the compiled, graph-captured step calls
them like any other operator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.kv_format import KV_FORMATS, Int8KV, KVFormat, LayerCache

TILE = 64  # positions per inner iteration
_TARGET_PROGRAMS = 1024  # (rows x kv_heads x splits) to aim for: several waves over an H100/H200's SMs
_MAX_SPLITS = 64


@triton.jit
def _split_kernel(Q, K, V, KScale, VScale, Table, Lengths, Out, Lse,
                  stride_q_row, stride_q_head,
                  stride_k_block, stride_k_pos, stride_k_head,
                  stride_v_block, stride_v_pos, stride_v_head,
                  stride_s_block, stride_s_pos,
                  stride_t_row,
                  stride_o_row, stride_o_head, stride_o_split,
                  stride_l_row, stride_l_head,
                  scale, split_len,
                  GROUPS: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, INT8: tl.constexpr):
    """INT8: K and V hold int8 codes and KScale/VScale their scales (one per block, position and kv
    head; contiguous heads); otherwise the scale pointers are not read."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    visible = tl.load(Lengths + row) + 1  # positions 0..length, the new token's included
    start = split * split_len
    end = tl.minimum(start + split_len, visible)
    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUPS + group
    in_group = group < GROUPS
    q = tl.load(Q + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :], mask=in_group[:, None],
                other=0.0)
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile in range(start, end, TILE):
        positions = tile + tl.arange(0, TILE)
        valid = positions < end
        block = tl.load(Table + row * stride_t_row + positions // BLOCK_SIZE, mask=valid, other=0)
        offset = positions % BLOCK_SIZE
        k = tl.load(K + (block * stride_k_block + offset * stride_k_pos + kv_head * stride_k_head)[:, None]
                    + dims[None, :], mask=valid[:, None], other=0.0)
        scale_at = block * stride_s_block + offset * stride_s_pos + kv_head  # INT8 only
        if INT8:
            # Codes are exact in the query's dtype: the product of the codes, then each position's scale.
            k_scale = tl.load(KScale + scale_at, mask=valid, other=0.0)
            scores = tl.dot(q, tl.trans(k.to(q.dtype))) * (k_scale * scale)[None, :]
        else:
            scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * rescale + tl.sum(weights, 1)
        v = tl.load(V + (block * stride_v_block + offset * stride_v_pos + kv_head * stride_v_head)[:, None]
                    + dims[None, :], mask=valid[:, None], other=0.0)
        if INT8:
            # Each position's value scale folded into its softmax weight, before the product with the codes.
            v_scale = tl.load(VScale + scale_at, mask=valid, other=0.0)
            acc = acc * rescale[:, None] + tl.dot((weights * v_scale[None, :]).to(q.dtype), v.to(q.dtype))
        else:
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        best = new_best
    empty = total == 0.0  # a split past the row's end
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, total)[:, None])
    lse = tl.where(empty, float("-inf"), best + tl.log(tl.where(empty, 1.0, total)))
    tl.store(Out + row * stride_o_row + heads[:, None] * stride_o_head + split * stride_o_split + dims[None, :], out,
             mask=in_group[:, None])
    tl.store(Lse + row * stride_l_row + heads * stride_l_head + split, lse, mask=in_group)


@triton.jit
def _combine_kernel(Out, Lse, Final, splits,
                    stride_o_row, stride_o_head, stride_o_split,
                    stride_l_row, stride_l_head,
                    stride_f_row, stride_f_head,
                    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    index = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    present = index < splits
    lse = tl.load(Lse + row * stride_l_row + head * stride_l_head + index, mask=present, other=float("-inf"))
    best = tl.max(lse, 0)
    best = tl.where(best == float("-inf"), 0.0, best)  # no visible position at all (never for a live row)
    weights = tl.exp(lse - best)
    parts = tl.load(Out + row * stride_o_row + head * stride_o_head + index[:, None] * stride_o_split + dims[None, :],
                    mask=present[:, None], other=0.0)
    total = tl.maximum(tl.sum(weights, 0), 1e-30)
    out = tl.sum(parts * weights[:, None], 0) / total
    tl.store(Final + row * stride_f_row + head * stride_f_head + dims, out.to(Final.dtype.element_ty))


def _splits(rows: int, kv_heads: int, span: int) -> int:
    wanted = -(-_TARGET_PROGRAMS // (rows * kv_heads))
    return max(1, min(wanted, _MAX_SPLITS, -(-span // TILE)))


def _attend(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, key_scales: torch.Tensor | None,
            value_scales: torch.Tensor | None, table: torch.Tensor, lengths: torch.Tensor, span: int,
            scale: float) -> torch.Tensor:
    """Both kernels over a plain cache (scales None) or an int8 one; q [rows, kv_heads, groups, D]."""
    rows, kv_heads, groups, head_dim = q.shape
    block_size = cache_k.shape[1]
    heads = q.reshape(rows, kv_heads * groups, head_dim)
    splits = _splits(rows, kv_heads, span)
    split_len = -(-span // splits)
    split_len = -(-split_len // TILE) * TILE
    partial = torch.empty((rows, kv_heads * groups, splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((rows, kv_heads * groups, splits), dtype=torch.float32, device=q.device)
    quantized = key_scales is not None
    if quantized:
        assert key_scales.stride() == value_scales.stride() and key_scales.stride(2) == 1
    scales = (key_scales, value_scales) if quantized else (cache_k, cache_v)  # not read without INT8
    _split_kernel[(rows, kv_heads, splits)](
        heads, cache_k, cache_v, *scales, table, lengths, partial, lse,
        heads.stride(0), heads.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        scales[0].stride(0), scales[0].stride(1),
        table.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        scale, split_len,
        GROUPS=groups, GROUP_PAD=max(16, triton.next_power_of_2(groups)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=TILE, INT8=quantized,
    )
    final = torch.empty((rows, kv_heads * groups, head_dim), dtype=q.dtype, device=q.device)
    _combine_kernel[(rows, kv_heads * groups)](
        partial, lse, final, splits,
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        final.stride(0), final.stride(1),
        SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
    )
    return final.view(rows, kv_heads, groups, head_dim)


@torch.library.custom_op("vlm_serve::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, table: torch.Tensor,
                           lengths: torch.Tensor, span: int, scale: float) -> torch.Tensor:
    """See `PagedDecodeAttention.__call__` (engine/attention/paged_decode.py); q [rows, kv_heads, groups, D]."""
    return _attend(q, cache_k, cache_v, None, None, table, lengths, span, scale)


@paged_decode_attention.register_fake
def _(q, cache_k, cache_v, table, lengths, span, scale):
    return torch.empty_like(q)


@torch.library.custom_op("vlm_serve::paged_decode_attention_int8", mutates_args=())
def paged_decode_attention_int8(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                                key_scales: torch.Tensor, value_scales: torch.Tensor, table: torch.Tensor,
                                lengths: torch.Tensor, span: int, scale: float) -> torch.Tensor:
    """`paged_decode_attention` over an int8 cache: codes `cache_k`/`cache_v` [num_blocks, block_size,
    kv_heads, D], their scales [num_blocks, block_size, kv_heads] (engine/attention/kv_int8.py)."""
    return _attend(q, cache_k, cache_v, key_scales, value_scales, table, lengths, span, scale)


@paged_decode_attention_int8.register_fake
def _(q, cache_k, cache_v, key_scales, value_scales, table, lengths, span, scale):
    return torch.empty_like(q)


class TritonPagedAttention:
    """`PagedDecodeAttention` by the kernels above (head_dim a power of two; CUDA), over a cache in
    `kv_format` (plain or int8)."""

    def __init__(self, kv_format: KVFormat = KV_FORMATS["none"]) -> None:
        self.int8 = isinstance(kv_format, Int8KV)

    def __call__(self, q: torch.Tensor, cache: LayerCache, table: torch.Tensor, lengths: torch.Tensor, span: int,
                 scale: float) -> torch.Tensor:
        if self.int8:
            return paged_decode_attention_int8(q.contiguous(), *cache, table, lengths, span, scale)
        return paged_decode_attention(q.contiguous(), *cache, table, lengths, span, scale)
