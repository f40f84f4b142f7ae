"""The vision encoder on a GPU: one attention call per block, so its blocks compile once.

HF's `Glm4vVisionAttention`, unless a flash attention implementation is configured, splits each
block's queries image by image and runs SDPA per image, reading every image's length on the host
first (a device synchronisation per block, 24 on GLM-4.6V). With a flash implementation it passes
all images' tokens packed together with their cumulative lengths (`cu_seqlens`) in one call.
PyTorch ships such a kernel (`torch.nn.attention.varlen.varlen_attn`, FlashAttention with
cu_seqlens), so it is registered here as a transformers attention function and the vision tower is
set to use it. Without host reads and per-image Python lists, the blocks then compile once for
every number and size of images (`compile_blocks`), where HF's split recompiled them for each new
number of images in a pass.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface

logger = logging.getLogger("ray.serve")

# transformers hands the packed tokens and cu_seqlens only to implementations whose name says
# "flash" (`is_flash_attention_requested`); this one is FlashAttention, through PyTorch.
VARLEN_ATTENTION = "flash_varlen_torch"


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                     scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                     cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | None = None,
                     max_length_k: int | None = None, is_causal: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface over `varlen_attn`: query/key/value come as
    [1, heads, tokens, head_dim] (all images packed), the output goes back as [1, tokens, heads, head_dim]."""
    from torch.nn.attention.varlen import varlen_attn

    if attention_mask is not None or is_causal or dropout:
        raise ValueError("varlen attention here serves the vision encoder only: no mask, no causality, no dropout")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, head_dim]
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling)
    return out[None], None


def unsupported_reason(model, device: torch.device) -> str | None:
    """Why the vision tower of `model` cannot use `varlen_attention` (None: it can)."""
    if device.type != "cuda":
        return "varlen attention is a CUDA kernel"
    if model.dtype not in (torch.bfloat16, torch.float16):
        return f"FlashAttention takes bfloat16 or float16, not {model.dtype}"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    visual = getattr(getattr(model, "model", None), "visual", None)
    if type(visual).__name__ != "Glm4vVisionModel":
        return f"its vision tower is {type(visual).__name__}, not Glm4vVisionModel"
    return None


def use_varlen_attention(model, device: torch.device) -> bool:
    """Switch the vision tower's attention to `varlen_attention` where it can run; say why not."""
    reason = unsupported_reason(model, device)
    if reason is not None:
        logger.info("The vision encoder keeps its attention implementation: %s", reason)
        return False
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    model.model.visual.config._attn_implementation = VARLEN_ATTENTION
    return True


def warm_up_images(model, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels and grid of two small images (1x1 and 1x3 merge units) to warm the encoder up.

    Their sizes are deliberately unround: compiled with dynamic shapes, a graph first traced on sizes
    that are multiples of 8 or 16 may assume that alignment and be compiled again for the sizes real
    images have (seconds of stall on a GPU, mid-serving). Traced on these, it fits any image."""
    config = model.model.visual.config
    merge = config.spatial_merge_size
    grid = torch.tensor([[1, merge, merge], [1, merge, 3 * merge]], device=device)
    patch = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    tokens = int(grid.prod(-1).sum())
    return torch.randn(tokens, patch, device=device, dtype=model.dtype), grid


def compile_blocks(model, mode: str) -> None:
    """torch.compile each vision block (regional compilation: the blocks share one compiled graph),
    dynamic shapes from the start so any number of image tokens reuses it."""
    for block in model.model.visual.blocks:
        block.compile(mode=mode, dynamic=True)
