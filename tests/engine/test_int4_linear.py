"""GPTQ 4-bit layers repacked for PyTorch's int4 matmul (engine/quant/int4_linear.py), on the CPU twin
of the CUDA kernel: the same values as GPTQ's own dequantization, for either zero-point format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.quant.gptq_layout import unpack_columns, unpack_rows
from engine.quant.int4_linear import (
    TINYGEMM_MAX_ROWS,
    Int4Linear,
    convertible,
    fuse,
    repack_gptq,
)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit codes -> int32 [R/8, C], row 8i+k in bits 4k..4k+3 (gptqmodel's qweight layout),
    written independently of the module under test."""
    rows, cols = codes.shape
    packed = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for k in range(8):
        packed |= codes[k::8].long() << (4 * k)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the sign bit, as int32 holds it


class FakeGPTQ(nn.Module):
    """A GPTQ layer's buffers (what gptqmodel's modules hold), made from known codes and zeros."""

    def __init__(self, in_features: int, out_features: int, group_size: int, zero_format: int | None,
                 bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        groups = in_features // group_size
        self.codes = torch.randint(0, 16, (in_features, out_features), generator=gen, dtype=torch.int32)
        self.zeros = torch.randint(1, 16, (groups, out_features), generator=gen, dtype=torch.int32)  # asymmetric
        stored = self.zeros - (1 if zero_format in (1, None) else 0)
        self.register_buffer("qweight", pack_rows(self.codes))
        self.register_buffer("qzeros", pack_rows(stored.t().contiguous()).t().contiguous())
        self.register_buffer("scales", (torch.rand(groups, out_features, generator=gen) * 0.02 + 0.001).half())
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group_size)
        self.bias = nn.Parameter(torch.randn(out_features, generator=gen), requires_grad=False) if bias else None
        self._zero_format = zero_format
        if zero_format is not None:  # gptqmodel's modules say which one they hold
            self.qzero_format = lambda: self._zero_format

    def weight(self) -> torch.Tensor:
        """GPTQ's dequantization, w = scale * (q - zero), as [out, in] float32."""
        group = self.g_idx.long()
        return (self.scales.float()[group] * (self.codes - self.zeros[group]).float()).t()


def test_unpacking_inverts_gptq_packing() -> None:
    codes = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(codes)), codes)
    assert torch.equal(unpack_columns(pack_rows(codes.t().contiguous()).t().contiguous()), codes)


# Both roads: a decode step of few rows (tinygemm's kernel), a prompt and a large step (dequantized).
SHAPES = [(3, 1, 256), (2, 5, 256), (TINYGEMM_MAX_ROWS + 1, 1, 256)]


@pytest.mark.parametrize("zero_format", [None, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_repacked_layer_computes_the_gptq_weights(zero_format: int | None, dtype: torch.dtype, shape) -> None:
    layer = FakeGPTQ(256, 48, 64, zero_format)
    fmt = zero_format or 1
    int4 = Int4Linear.from_gptq(layer.qweight, layer.qzeros, layer.scales, 64, layer.bias, fmt, dtype)
    x = torch.randn(*shape)
    expected = x @ layer.weight().t() + layer.bias
    got = int4(x)
    assert got.shape == (*shape[:-1], 48) and got.dtype == x.dtype
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 activations: ~3 significant digits
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_the_wrong_zero_format_would_be_caught() -> None:
    """The format matters (one code step per weight): the check above can tell them apart."""
    layer = FakeGPTQ(256, 48, 64, 2)
    wrong = Int4Linear.from_gptq(layer.qweight, layer.qzeros, layer.scales, 64, layer.bias, 1, torch.float32)
    x = torch.randn(4, 256)
    expected = x @ layer.weight().t() + layer.bias
    assert (wrong(x) - expected).abs().max() > 1e-2 * expected.abs().max()


def test_repack_replaces_what_tinygemm_can_run_and_keeps_the_rest() -> None:
    model = nn.Sequential(FakeGPTQ(256, 64, 64, 2, seed=1), nn.ReLU(), FakeGPTQ(64, 64, 64, 2, seed=2),
                          FakeGPTQ(256, 64, 128, 2, seed=3), FakeGPTQ(128, 16, 32, 1, seed=4))
    model[3].g_idx = model[3].g_idx.flip(0)  # desc_act: permuted groups
    assert convertible(model[2]) is not None and "in % 128" in convertible(model[2])
    assert convertible(model[3]) == "permuted groups (desc_act)"
    x = torch.randn(3, 256)
    expected = x @ model[0].weight().t() + model[0].bias
    assert repack_gptq(model, torch.float32) == 2
    assert [type(m).__name__ for m in model] == ["Int4Linear", "ReLU", "FakeGPTQ", "FakeGPTQ", "Int4Linear"]
    assert torch.allclose(model[0](x), expected, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_projections_give_each_output_and_share_the_codes(shape) -> None:
    """A layer's q, k and v as one module: the same outputs, side by side, with the codes held once."""
    def int4(out_features: int, seed: int) -> Int4Linear:
        layer = FakeGPTQ(256, out_features, 64, 2, seed=seed)
        return Int4Linear.from_gptq(layer.qweight, layer.qzeros, layer.scales, 64, layer.bias, 2, torch.float32)

    q, k, v = int4(64, 1), int4(16, 2), int4(16, 3)
    x = torch.randn(*shape)
    expected = torch.cat([q(x), k(x), v(x)], dim=-1)
    fused = fuse([q, k, v])
    assert torch.allclose(fused(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(torch.cat([q(x), k(x), v(x)], dim=-1), expected, atol=1e-5, rtol=1e-5)
    # The parts' codes are views of the fused ones; they give up tinygemm's copy and still compute.
    assert v.pairs.untyped_storage().data_ptr() == fused.pairs.untyped_storage().data_ptr()
    assert not any(m.on_tinygemm for m in (q, k, v)) and fused.on_tinygemm
    assert fuse([q, nn.Linear(256, 16)]) is None
