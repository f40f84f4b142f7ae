"""Attention of a continued prompt chunk: bottom-right causal over the gathered blocks, whatever lies
past the chunk's end ignored, grouped heads as transformers' repeat_kv arranges them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention.continued_prompt import continued_prompt_attention


def case(width: int, end: int, span: int, kv_heads: int, groups: int, dtype: torch.dtype, device: str):
    """A chunk of `width` queries ending at position `end`, keys gathered over `span` positions (the
    ones past `end` garbage, large enough to show if they were read), and the reference: plain causal
    attention over the whole sequence of `end` positions, of which the chunk is the last rows."""
    generator = torch.Generator().manual_seed(width * 7 + end)
    heads, head_dim = kv_heads * groups, 64

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    q_all = randn(1, end, heads, head_dim)
    keys, values = randn(1, span, kv_heads, head_dim), randn(1, span, kv_heads, head_dim)
    keys[:, end:], values[:, end:] = 1e4, 1e4
    expected = F.scaled_dot_product_attention(
        q_all.transpose(1, 2), keys[:, :end].transpose(1, 2).repeat_interleave(groups, dim=1),
        values[:, :end].transpose(1, 2).repeat_interleave(groups, dim=1), is_causal=True, scale=0.125,
    ).transpose(1, 2)[:, end - width:]

    def on(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype)

    q = on(q_all[:, end - width:])
    # Heads-first views of [1, span, kv_heads, head_dim] blocks, as KVFormat.load gives them.
    bounds = torch.tensor([[0, width], [0, end]], dtype=torch.int32, device=device)
    return q, on(keys).transpose(1, 2), on(values).transpose(1, 2), bounds, expected


@pytest.mark.parametrize(("width", "end", "span"), [(5, 37, 48), (40, 40, 48), (1, 100, 112), (33, 97, 112)])
def test_the_chunk_sees_its_prefix_and_itself_causally_on_the_cpu(width: int, end: int, span: int) -> None:
    q, keys, values, bounds, expected = case(width, end, span, kv_heads=2, groups=4, dtype=torch.float32,
                                             device="cpu")
    out = continued_prompt_attention(q, keys, values, bounds, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel needs CUDA")
@pytest.mark.parametrize(("width", "end", "span"), [(5, 37, 48), (40, 40, 48), (1, 100, 112), (387, 3602, 3616)])
def test_flash_attention_on_the_gpu_matches_the_reference(width: int, end: int, span: int) -> None:
    q, keys, values, bounds, expected = case(width, end, span, kv_heads=2, groups=16, dtype=torch.bfloat16,
                                             device="cuda")
    out = continued_prompt_attention(q, keys, values, bounds, 0.125)
    torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2)
    compiled = torch.compile(continued_prompt_attention, dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(q, keys, values, bounds, 0.125), out)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlashAttention's varlen kernel needs CUDA"))])
def test_padding_rows_past_the_true_width_change_nothing_and_stay_finite(device: str) -> None:
    """A CUDA graph pads the chunk's columns to a bucket; `bounds` then holds the true width."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, keys, values, _, expected = case(21, 70, 80, kv_heads=2, groups=4, dtype=dtype, device=device)
    padded = torch.cat([q, torch.full_like(q[:, :11], 3.0)], dim=1)  # 32 columns, 11 of them padding
    bounds = torch.tensor([[0, 21], [0, 70]], dtype=torch.int32, device=device)
    out = continued_prompt_attention(padded, keys, values, bounds, 0.125)
    tolerance = 1e-5 if device == "cpu" else 2e-2
    torch.testing.assert_close(out[:, :21].float().cpu(), expected, atol=tolerance, rtol=tolerance)
    assert torch.isfinite(out[:, 21:]).all()
    if device == "cuda":
        assert not out[:, 21:].any()  # the kernel leaves those rows unwritten: zeroed
