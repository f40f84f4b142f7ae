"""The int8 KV cache's number format: 8-bit codes with one float32 scale per (token position, kv head).

For one head's key (or value) vector x at one position:
    scale = max(absmax(x) / 127, MIN_SCALE)        code = clamp(round(x / scale), -127, 127)
and x is read back as code * scale, within scale / 2 of what was written in every element (zeros
stay zero). Symmetric: no zero point, so an int8 code is exact in bf16 and a kernel can take the dot
product of the codes first and multiply by the scale after.

Why a scale per position and head, not per block: a block of the paged cache fills one token at a
time while a sequence decodes, so a per-block scale would be fixed before its later tokens exist (or
every write would requantize the block). LMDeploy's int8 KV cache scales per token and head the same
way. The cost: head_dim bytes of codes plus 4 of scale per head and position, for head_dim 128 132
bytes where bf16 takes 256 (51.6%).
"""

from __future__ import annotations

import torch

QMAX = 127  # symmetric: -128 is never used, so negating a code stays in range
# Keeps an all-zero vector's scale finite (its codes are then 0), and the division well clear of
# subnormals, which some GPU kernels flush to zero.
MIN_SCALE = 1e-8


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, x's shape) and scales (float32, x's shape without its last dimension) for `x`
    [..., head_dim]: one scale per vector along the last dimension. Elementwise and a reduction only:
    traceable by torch.compile and capturable in a CUDA graph."""
    values = x.float()
    scales = (values.abs().amax(dim=-1) / QMAX).clamp(min=MIN_SCALE)
    codes = (values / scales[..., None]).round().clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codes` [..., head_dim] times their `scales` [...], in `dtype`."""
    return (codes.float() * scales[..., None]).to(dtype)
