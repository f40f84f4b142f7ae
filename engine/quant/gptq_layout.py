"""GPTQ checkpoints' packed layout, read into plain tensors any kernel can repack from.

Layouts read (gptqmodel's, as saved and as loaded by its `torch` kernel), for b bits (4 or 8) and
p = 32 // b values per int32:
- `qweight` int32 [in/p, out]: input row p*i+k in bits b*k..b*k+b-1 of row i;
- `qzeros` int32 [groups, out/p]: output column p*j+k in bits b*k..b*k+b-1 of column j; format 1
  (on disk, and every module without a `qzero_format()`) stores zero - 1, format 2 stores zero;
- `scales` [groups, out]; `g_idx` int32 [in]: the group of each input column. Only the plain order
  (g_idx[i] == i // group_size) is read here; `desc_act` checkpoints with permuted groups keep
  gptqmodel's module.
A weight is w = scale * (code - zero), per group of `group_size` input columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def unpack_rows(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [R, C] of packed `bits`-bit values -> int32 [R*p, C]: row p*i+k from bits b*k.. of row i."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, packed.shape[1])


def pack_rows(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [R*p, C] of `bits`-bit values -> int32 [R, C]: `unpack_rows`' inverse."""
    p = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=codes.device)
    grouped = codes.to(torch.int32).reshape(-1, p, codes.shape[1]) << shifts[None, :, None]
    packed = torch.zeros(grouped.shape[0], codes.shape[1], dtype=torch.int32, device=codes.device)
    for k in range(p):  # disjoint bits: OR them in (a sum would overflow int32 into the sign)
        packed |= grouped[:, k]
    return packed


def unpack_columns(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [R, C] of packed `bits`-bit values -> int32 [R, C*p]: column p*j+k from bits b*k.. of column j."""
    return unpack_rows(packed.t().contiguous(), bits).t().contiguous()


@dataclass
class GptqWeights:
    """One GPTQ layer unpacked, output rows first: w[o, i] = scales[o, g] * (codes[o, i] - zeros[o, g])
    with g = i // group_size."""

    codes: torch.Tensor  # uint8 [out, in], 0 .. 2**bits - 1
    scales: torch.Tensor  # [out, groups], the checkpoint's dtype
    zeros: torch.Tensor  # [out, groups], the same dtype (whole numbers)
    bits: int
    group_size: int
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @classmethod
    @torch.no_grad()
    def from_buffers(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                     bias: torch.Tensor | None = None, zero_format: int = 1) -> GptqWeights:
        codes = unpack_rows(qweight, bits).t().contiguous().to(torch.uint8)
        out_features, groups = codes.shape[0], scales.shape[0]
        zeros = unpack_columns(qzeros, bits)[:, :out_features] + (1 if zero_format == 1 else 0)
        return cls(codes, scales.t().contiguous(), zeros.t().contiguous().to(scales.dtype), bits,
                   codes.shape[1] // groups, None if bias is None else bias.detach().clone())

    @classmethod
    def from_module(cls, module: nn.Module) -> GptqWeights:
        """From a gptqmodel layer (or any module holding its buffers)."""
        zero_format = module.qzero_format() if hasattr(module, "qzero_format") else 1
        bias = getattr(module, "bias", None)
        return cls.from_buffers(module.qweight, module.qzeros, module.scales, gptq_bits(module),
                                bias if isinstance(bias, torch.Tensor) else None, zero_format)

    @classmethod
    def concat(cls, parts: list[GptqWeights]) -> GptqWeights:
        """The layers' outputs side by side (a fused q/k/v projection): same inputs, bits and groups."""
        first = parts[0]
        if any((p.in_features, p.bits, p.group_size, p.bias is None)
               != (first.in_features, first.bits, first.group_size, first.bias is None) for p in parts):
            raise ValueError("only layers over the same input, with the same bits and groups, concatenate")
        bias = None if first.bias is None else torch.cat([p.bias for p in parts])
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                   torch.cat([p.zeros for p in parts]), first.bits, first.group_size, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w as [out, in] (for checks; the kernels never hold it)."""
        codes = self.codes.to(torch.float32).view(self.out_features, -1, self.group_size)
        weight = (codes - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        return weight.view(self.out_features, self.in_features).to(dtype)


def is_gptq_layer(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), torch.Tensor) for name in ("qweight", "qzeros", "scales", "g_idx"))


def gptq_bits(module: nn.Module) -> int:
    """The layer's bit width: its `bits` attribute, else what its qweight's packing says."""
    bits = getattr(module, "bits", None)
    if bits is not None:
        return int(bits)
    return 32 * module.qweight.shape[0] // module.g_idx.shape[0]


def plain_group_order(module: nn.Module, group_size: int) -> bool:
    """Whether the layer's groups are consecutive input columns (no `desc_act` permutation)."""
    plain = torch.arange(module.g_idx.shape[0], device=module.g_idx.device) // group_size
    return torch.equal(module.g_idx.long(), plain)
