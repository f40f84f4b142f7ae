"""Attention for a prompt chunk that continues its sequence: a chunk after a prefix the cache gave,
or a chunked prefill's later chunk. Its queries see every earlier position, and their own chunk
causally; that is causal attention aligned at the bottom right of the (queries x keys) square.

PyTorch's SDPA has no bottom-right causal flag for its fast kernels, only an explicit mask, which
rules FlashAttention out and sends the call to the memory-efficient kernel (on the H200 that took
250 us a layer of a 400-token chunk over 3,600 positions) or to cuDNN (which plans every new shape
on the host). FlashAttention's own varlen entry point aligns causal masks at the bottom right, reads
grouped key/value heads as they are, and takes the key length as a device tensor, so the gathered
blocks need no trimming and the call has no host-side setup. It runs where FlashAttention does
(CUDA, fp16/bf16); elsewhere, SDPA with the explicit mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def continued_prompt_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bounds: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Attention output [1, width, heads, head_dim] for the chunk's queries `q` of that shape.

    `keys` and `values` [1, kv_heads, span, head_dim] are heads-first views of the gathered blocks
    (KVFormat.load), the chunk's own keys and values already in them; of their positions only the
    first `end` count. `bounds` [2, 2] int32 on the device is [[0, w], [0, end]]: the cumulative
    query and key lengths, as varlen kernels take them; w is `width`, or less when the columns past w
    are padding (their outputs are any finite values). Query t (position end - w + t) sees key
    positions 0..end - w + t. Query head g of kv head h is head h * groups + g. Traceable by
    torch.compile with dynamic shapes (no host reads).
    """
    width, span = q.shape[1], keys.shape[2]
    if q.is_cuda and q.dtype in FLASH_DTYPES:
        # [total, heads, head_dim] as the varlen kernel takes them: the blocks' own layout, no copy.
        out = torch.ops.aten._flash_attention_forward(
            q[0], keys[0].transpose(0, 1), values[0].transpose(0, 1), bounds[0], bounds[1], width, span,
            0.0, True, False, scale=scale,
        )[0]
        # Query rows past `bounds[0, 1]` (a CUDA graph's padding, prefill_graphs.py) are left unwritten by
        # the kernel: zeros rather than whatever the memory held, so nothing non-finite flows on.
        rows = torch.arange(width, device=q.device)[:, None, None]
        return torch.where(rows < bounds[0, 1], out, 0.0)[None]
    # The explicit mask: query t sees positions up to end - w + t.
    first = (bounds[1, 1] - bounds[0, 1]).to(torch.long)
    visible = (torch.arange(span, device=q.device)[None, :]
               <= first + torch.arange(width, device=q.device)[:, None])[None, None]
    groups = q.shape[2] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible, scale=scale)
    return out.transpose(1, 2)
