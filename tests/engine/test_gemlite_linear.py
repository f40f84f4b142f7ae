"""GPTQ layers repacked for gemlite (engine/quant/gemlite_linear.py).

gemlite's kernels need a CUDA GPU (the package reads the GPU at import), so on the CPU the packing
step is replaced by a reference layer computing x @ W.T from the same unpacked weights: what is tested
here is ours, which layers get replaced, the q/k/v fusion and each projection's slice of it. The
kernels themselves are checked against the dequantized weights on the GPU (the CUDA test below, and
benchmarks/common.py's `gptq_weights` on every GPU benchmark run)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.common import GPTQLinear
from engine.quant import gemlite_linear
from engine.quant.gemlite_linear import GemliteLinear, convertible
from engine.quant.gptq_layout import GptqWeights
from engine.quant.repack import OutputSlice, repack_layers


class Reference(nn.Module):
    def __init__(self, weights: GptqWeights) -> None:
        super().__init__()
        self.weight = weights.dequantized()
        self.bias = weights.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.float(), self.weight, self.bias)


@pytest.fixture
def reference_packing(monkeypatch):
    packed: list[GptqWeights] = []

    def from_weights(cls, weights, dtype, device):
        packed.append(weights)
        return cls(Reference(weights), weights.in_features, weights.out_features, weights.bits)

    monkeypatch.setattr(GemliteLinear, "from_weights", classmethod(from_weights))
    return packed


def repack_gptq(model: nn.Module) -> int:
    return repack_layers(model, GemliteLinear, convertible, torch.float32, torch.device("cpu"))


def gptq(in_features: int, out_features: int, bits: int = 4, seed: int = 0) -> GPTQLinear:
    torch.manual_seed(seed)
    return GPTQLinear.from_linear(nn.Linear(in_features, out_features, bias=False), group_size=64, bits=bits)


class Attention(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = gptq(128, 64, bits, 1), gptq(128, 32, bits, 2), gptq(128, 32, bits, 3)
        self.o_proj = gptq(64, 128, bits, 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_q_k_v_become_one_layer_and_each_projection_its_slice(reference_packing, bits: int) -> None:
    model = nn.Sequential(Attention(bits))
    attn = model[0]
    x = torch.randn(3, 128)
    expected = {name: x @ GptqWeights.from_module(getattr(attn, name)).dequantized().t()
                for name in ("q_proj", "k_proj", "v_proj")}
    assert repack_gptq(model) == 4
    assert isinstance(attn.qkv_proj, GemliteLinear) and attn.qkv_proj.out_features == 128
    assert isinstance(attn.o_proj, GemliteLinear)
    assert len(reference_packing) == 2  # one packing for q/k/v together, one for o: no second copy
    for name, want in expected.items():
        layer = getattr(attn, name)
        assert isinstance(layer, OutputSlice) and layer.fused is attn.qkv_proj
        assert torch.allclose(layer(x), want, atol=1e-5)
    fused = attn.qkv_proj(x)
    assert torch.allclose(fused, torch.cat(list(expected.values()), dim=-1), atol=1e-5)


def test_layers_gemlite_cannot_take_keep_their_module(reference_packing) -> None:
    odd = GPTQLinear.from_linear(nn.Linear(96, 32, bias=False), group_size=48)  # groups of 48 columns
    assert "group size" in convertible(odd)
    permuted = gptq(128, 32)
    permuted.g_idx = permuted.g_idx.flip(0)  # desc_act's reordering
    assert "permuted" in convertible(permuted)
    model = nn.Sequential(odd, permuted, gptq(128, 32))
    assert repack_gptq(model) == 1
    assert model[0] is odd and model[1] is permuted and isinstance(model[2], GemliteLinear)


@pytest.mark.skipif(not gemlite_linear.available(), reason="gemlite runs on CUDA GPUs with gemlite installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_gemlite_computes_the_gptq_weights(bits: int) -> None:
    layer = gptq(4096, 512, bits).cuda()
    weights = GptqWeights.from_module(layer)
    packed = GemliteLinear.from_weights(weights, torch.bfloat16, torch.device("cuda"))
    for rows in (1, 8, 64):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ weights.dequantized().cuda().t()
        got = packed(x).float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
