"""GPTQ's packed layout read into plain tensors (engine/quant/gptq_layout.py), for 4 and 8 bits,
checked against packing written here independently of the module under test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.quant.gptq_layout import GptqWeights, gptq_bits, plain_group_order, unpack_columns, unpack_rows


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes -> int32 [R/p, C], row p*i+k in bits b*k.. of row i (gptqmodel's qweight layout)."""
    per = 32 // bits
    packed = torch.zeros(codes.shape[0] // per, codes.shape[1], dtype=torch.int64)
    for k in range(per):
        packed |= codes[k::per].long() << (bits * k)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


class Buffers(nn.Module):
    """A GPTQ layer's buffers from known codes and (asymmetric) zeros, zero format 1 (zero - 1 stored)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bits: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        groups, top = in_features // group_size, 2 ** bits
        self.codes = torch.randint(0, top, (in_features, out_features), generator=gen, dtype=torch.int32)
        self.zeros = torch.randint(1, top, (groups, out_features), generator=gen, dtype=torch.int32)
        self.register_buffer("qweight", pack_rows(self.codes, bits))
        self.register_buffer("qzeros", pack_rows((self.zeros - 1).t().contiguous(), bits).t().contiguous())
        self.register_buffer("scales", (torch.rand(groups, out_features, generator=gen) * 0.02 + 0.001).half())
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group_size)
        self.bias = None

    def weight(self) -> torch.Tensor:
        group = self.g_idx.long()
        return (self.scales.float()[group] * (self.codes - self.zeros[group]).float()).t()


@pytest.mark.parametrize("bits", [4, 8])
def test_unpacking_inverts_packing(bits: int) -> None:
    codes = torch.randint(0, 2 ** bits, (64, 24), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits), codes)
    assert torch.equal(unpack_columns(pack_rows(codes.t().contiguous(), bits).t().contiguous(), bits), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_read_from_a_layer_dequantize_to_gptqs_own(bits: int) -> None:
    layer = Buffers(256, 48, 64, bits)
    weights = GptqWeights.from_module(layer)
    assert (weights.bits, weights.group_size, weights.in_features, weights.out_features) == (bits, 64, 256, 48)
    assert gptq_bits(layer) == bits  # from the packing, the layer having no `bits` attribute
    assert torch.allclose(weights.dequantized(), layer.weight(), atol=1e-6)
    assert plain_group_order(layer, 64) and not plain_group_order(layer, 32)


def test_concatenated_layers_give_each_output_side_by_side() -> None:
    layers = [Buffers(128, width, 32, 4, seed=i) for i, width in enumerate((64, 16, 16))]
    fused = GptqWeights.concat([GptqWeights.from_module(layer) for layer in layers])
    assert torch.allclose(fused.dequantized(), torch.cat([layer.weight() for layer in layers]), atol=1e-6)
    with pytest.raises(ValueError):
        GptqWeights.concat([GptqWeights.from_module(Buffers(128, 16, 32, 4)), GptqWeights.from_module(Buffers(128, 16, 64, 4))])
