"""GPTQ 4-bit linear layers on PyTorch's own int4 weight-only matmul (tinygemm).

Why this exists: gptqmodel's GPU kernels are Marlin (built with nvcc on each machine at first use)
or Triton, and neither has run inside the continuous engine's compiled, graph-captured decode step.
PyTorch ships an int4 weight-only matmul, `aten._weight_int4pack_mm` (tinygemm; CUDA, Ampere or
newer, bf16), which gpt-fast and torchao run under torch.compile and CUDA graphs; its CPU twin,
`aten._weight_int4pack_mm_for_cpu`, is what gptqmodel's own CPU kernel (`torch_fused`) calls and
what lets the CPU tests check the repacking here. No library converts GPTQ's layout to it on a GPU
(gptqmodel's torch_fused does it for CPU and XPU only), hence this module.

The maths is exact: GPTQ stores, per group of `group_size` input columns, w = scale * (q - zero);
tinygemm computes w = scale * (q - 8) + offset, so offset = scale * (8 - zero).

tinygemm is a kernel for few rows: on an H100 with GLM-4.6V's shape it decodes one sequence at
224 tok/s (bf16: 113), but a 285-token prompt took 0.18 s to prefill, and 32 prompts 2.3 s, since it
reads the weights again for every 16 rows. So, as ExLlama does, many rows take the other road: the
layer's weight is dequantized to the activations' dtype (one fused elementwise kernel once compiled)
and multiplied by cuBLAS. That keeps a second copy of the 4-bit codes, in a plain layout (tinygemm's
is tiled and undocumented): about 8.5 bits per weight in all, against bf16's 16.

The checkpoint's layout is read by engine/quant/gptq_layout.py. Only the plain group order
(no `desc_act` permutation) maps onto tinygemm's groups; other checkpoints keep gptqmodel's module.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.quant.gptq_layout import GptqWeights, is_gptq_layer, plain_group_order

logger = logging.getLogger("ray.serve")

BITS = 4
PACK = 32 // BITS  # 4-bit values per int32
INNER_K_TILES = 8  # tinygemm's tiling on CUDA (gpt-fast's and torchao's choice); needs in % 128 == 0
# Decode steps of up to this many rows run on tinygemm; prompts and larger steps dequantize. On the H100
# a step of 8 rows took 7.7 ms on tinygemm (bf16: 9.0 ms) and one of 32 rows 20.6 ms.
TINYGEMM_MAX_ROWS = 16


def _tinygemm_layout(pairs: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] codes (two a byte, the even column high) in tinygemm's layout for their device."""
    if pairs.is_cuda:
        return torch.ops.aten._convert_weight_to_int4pack(pairs, INNER_K_TILES)
    codes = torch.stack([pairs >> 4, pairs & 0xF], dim=-1).view(pairs.shape[0], -1).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W held as 4-bit codes with per-group scales and offsets, twice: in
    tinygemm's layout for decode steps of few rows, in a plain one for everything else."""

    def __init__(self, packed: torch.Tensor | None, pairs: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = pairs.shape[0], pairs.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("packed", packed)  # tinygemm's layout; None: dequantize always (see fuse)
        self.register_buffer("pairs", pairs)  # uint8 [out, in/2]: two codes a byte, the even column high
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [groups, out, 2], the activations' dtype
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                  bias: torch.Tensor | None = None, zero_format: int = 1,
                  dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """From one GPTQ 4-bit layer's buffers (see the module docstring), for activations of `dtype`
        (bf16 on CUDA, where tinygemm takes nothing else)."""
        weights = GptqWeights.from_buffers(qweight, qzeros, scales, BITS, bias, zero_format)
        codes, zeros = weights.codes.to(torch.int32), weights.zeros.t().to(torch.int32)  # [out, in]; [groups, out]
        scales = weights.scales.t().to(torch.float32)
        offsets = (2 ** (BITS - 1) - zeros).to(torch.float32) * scales
        scales_and_zeros = torch.stack([scales, offsets], dim=-1).to(dtype).contiguous()
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # torchao's packing for tinygemm too
        bias = None if bias is None else bias.detach().to(dtype).clone()
        return cls(_tinygemm_layout(pairs), pairs, scales_and_zeros, group_size, bias)

    @property
    def on_tinygemm(self) -> bool:
        return self.packed is not None

    def dequantized(self) -> torch.Tensor:
        """W as [out, in] in the activations' dtype."""
        codes = torch.stack([self.pairs >> 4, self.pairs & 0xF], dim=-1)  # [out, in/2, 2]
        codes = codes.view(self.out_features, -1, self.group_size).to(self.scales_and_zeros.dtype)
        scales = self.scales_and_zeros[..., 0].t()[..., None]  # [out, groups, 1]
        offsets = self.scales_and_zeros[..., 1].t()[..., None]
        return ((codes - 2 ** (BITS - 1)) * scales + offsets).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.scales_and_zeros.dtype
        # A decode step has one token per row: [rows, 1, in] (a plain [rows, in] counts as one too).
        decode_rows = x.shape[0] if x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1) else None
        if self.packed is None or decode_rows is None or decode_rows > TINYGEMM_MAX_ROWS:
            return nn.functional.linear(x.to(dtype), self.dequantized(), self.bias).to(x.dtype)
        flat = x.reshape(-1, self.in_features).to(dtype)
        if flat.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                             self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def fuse(modules: list[nn.Module]) -> Int4Linear | None:
    """One `Int4Linear` giving the outputs of `modules` side by side (a layer's q, k and v: one
    kernel where three ran, the small k and v ones far from the memory bandwidth), or None unless
    all are `Int4Linear`s over the same input.

    The codes are held once: the modules' plain codes become views of the fused ones, and they give
    up their tinygemm copy (its tiles need not split where the modules do), so they compute on the
    dequantizing road from then on (HF's generate() still calls them; the engine calls the fused one)."""
    if not modules or not all(isinstance(m, Int4Linear) and m.packed is not None for m in modules):
        return None
    first = modules[0]
    if any((m.in_features, m.group_size, m.scales_and_zeros.dtype, m.bias is None)
           != (first.in_features, first.group_size, first.scales_and_zeros.dtype, first.bias is None) for m in modules):
        return None
    pairs = torch.cat([m.pairs for m in modules])
    bias = None if first.bias is None else torch.cat([m.bias for m in modules])
    fused = Int4Linear(_tinygemm_layout(pairs), pairs, torch.cat([m.scales_and_zeros for m in modules], dim=1),
                       first.group_size, bias)
    start = 0
    for m in modules:
        m.pairs, m.packed = fused.pairs[start:start + m.out_features], None
        start += m.out_features
    return fused


def convertible(module: nn.Module) -> str | None:
    """Why a GPTQ layer cannot become an `Int4Linear` (None: it can)."""
    bits = getattr(module, "bits", BITS)
    if bits != BITS:
        return f"{bits} bits"
    in_features, out_features = module.qweight.shape[0] * PACK, module.qweight.shape[1]
    groups = module.scales.shape[0]
    group_size = in_features // groups
    if group_size * groups != in_features or group_size not in (32, 64, 128, 256):
        return f"group size {in_features}/{groups} (tinygemm takes 32, 64, 128 or 256)"
    if in_features % (INNER_K_TILES * 16) or out_features % 8:
        return f"shape {in_features}x{out_features} (needs in % 128 == 0 and out % 8 == 0)"
    if not plain_group_order(module, group_size):
        return "permuted groups (desc_act)"
    return None


def repack_gptq(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every 4-bit GPTQ layer of `model` (gptqmodel's modules, or any module holding the same
    buffers) by an `Int4Linear` for activations of `dtype`; returns how many were replaced. Layers
    that cannot be repacked keep their module, with a warning."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_gptq_layer(module):
            continue
        reason = convertible(module)
        if reason is not None:
            logger.warning("%s stays on gptqmodel's kernel: %s", name, reason)
            continue
        zero_format = module.qzero_format() if hasattr(module, "qzero_format") else 1
        bias = getattr(module, "bias", None)
        repacked = Int4Linear.from_gptq(module.qweight, module.qzeros, module.scales,
                                        module.qweight.shape[0] * PACK // module.scales.shape[0],
                                        bias if isinstance(bias, torch.Tensor) else None, zero_format, dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, repacked)
        replaced += 1
    return replaced
