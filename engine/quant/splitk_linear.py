"""GPTQ 4- and 8-bit linear layers on our split-K Triton kernel (engine/quant/splitk_kernel.py).

The layer holds the checkpoint's packed codes as they are (int32 [in / p, out]), its scales in the
activations' dtype and its zero points as bytes: one copy, about the checkpoint's size. Fusing a
layer's q, k and v (the decoder does) concatenates the three along the output dimension, which in
this layout is a plain concatenation of the packed words.

The kernel is a torch custom op with a fake implementation, so the continuous engine's compiled,
graph-captured decode step calls it like any operator. Launch parameters come from `config_for`:
the H200's measured best where a shape was swept (`TUNED`), a rule of thumb elsewhere. Nothing is
autotuned while serving.

CUDA with bf16 or fp16 activations runs the kernel, for up to DEQUANTIZE_MIN_ROWS rows (decode steps);
a prompt's chunk of more rows multiplies by the dequantized weight instead (see the constant).
Triton's interpreter runs the kernel on the CPU for the tests (TRITON_INTERPRET=1, fp16 or float32:
the interpreter has no bf16); elsewhere on the CPU the layer multiplies by its dequantized weight.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from engine.quant.gptq_layout import GptqWeights, pack_rows, unpack_rows
from engine.quant.repack import unsupported

logger = logging.getLogger("ray.serve")


def _out_of_resources() -> type[Exception]:
    """Triton's error for a launch that needs more shared memory or registers than the GPU has."""
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # another Triton layout: nothing to catch
        return type("NeverRaised", (Exception,), {})
    return OutOfResources


OUT_OF_RESOURCES = _out_of_resources()

BITS = (4, 8)
MAGIC = {  # (dtype, bits) -> (bit pattern of the base, the base): see the kernel module's docstring
    (torch.bfloat16, 4): (0x4300, 128.0),
    (torch.float16, 4): (0x6400, 1024.0),
    (torch.float16, 8): (0x6400, 1024.0),
}


@dataclass(frozen=True)
class KernelConfig:
    """A launch. block_m of 1, 2 or 4: the GEMV kernel (that many rows per program, no tensor cores),
    whose tile is block_k inputs (block_k * bits / 32 words) by block_n outputs; 16 or more: the
    tensor-core kernel's tiles."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


TUNED_PATH = Path(__file__).with_name("splitk_tuned.json")


def load_tuned(path: Path = TUNED_PATH) -> dict[tuple[int, int, int, int], KernelConfig]:
    """The measured best launch per (bits, rows bucket, in, out), as `benchmarks/quant_matmul.py --sweep
    --write-tuned` writes it (on an H200; benchmarks/RESULTS.md has the figures). Empty without the file."""
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text())["configs"]
    return {(e["bits"], e["bucket"], e["in"], e["out"]): KernelConfig(**e["config"]) for e in entries}


TUNED = load_tuned()

_SMS = 132  # an H100's or H200's SMs: the rule of thumb aims for a few programs each
ROWS_BUCKETS = (1, 2, 4, 16, 32, 64, 128)  # then one for more rows (0)
GEMV_MAX_ROWS = 4  # the GEMV kernel's most rows per program
# From this many rows (a prompt's chunk) the layer makes its weight in bf16 and multiplies with
# cuBLAS: dequantizing costs about one write and one read of the bf16 weight, whatever the rows, and
# cuBLAS at these sizes is compute-bound where the Triton GEMM dequantizes each tile again for every
# block of rows (the H200's figures at 128 and 512 rows: benchmarks/RESULTS.md).
DEQUANTIZE_MIN_ROWS = 256


def rows_bucket(rows: int) -> int:
    return next((b for b in ROWS_BUCKETS if rows <= b), 0)


def config_for(rows: int, in_features: int, out_features: int, bits: int, group_size: int) -> KernelConfig:
    """Launch parameters for `rows` x `in_features` by `in_features` x `out_features` codes."""
    tuned = TUNED.get((bits, rows_bucket(rows), in_features, out_features))
    if tuned is not None and group_size % tuned.block_k == 0:
        return tuned
    block_k = next(b for b in (128, 64, 32, 16) if group_size % b == 0)
    if rows > 64:  # a prompt: a plain tiled GEMM, no split
        return KernelConfig(64 if rows <= 128 else 128, 128, block_k, 1, 8, 3)
    block_m = min(rows, GEMV_MAX_ROWS) if rows <= GEMV_MAX_ROWS else max(16, rows_bucket(rows))
    block_m = 4 if block_m == 3 else block_m
    block_n = 128 if rows <= 16 else 64
    programs = -(-out_features // block_n)
    tiles = in_features // block_k
    split_k = 1
    while programs * split_k * 2 <= 4 * _SMS and split_k * 2 <= tiles // 2:
        split_k *= 2
    return KernelConfig(block_m, block_n, block_k, split_k, 4, 4)


def splitk_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bias: torch.Tensor | None, bits: int, group_size: int,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in float32 (split-K shares add there), W given as the kernel module
    describes. `config`: the launch, which must fit the GPU; without one, `config_for`'s, made smaller
    until it fits (see `smaller`)."""
    rows, in_features = x.shape
    out_features = qweight.shape[1]
    if config is not None:
        return _launch(config, x, qweight, scales, zeros, bias, bits, group_size)
    key = (bits, rows_bucket(rows), in_features, out_features, group_size, x.device)
    config = _FITTED.get(key) or config_for(rows, in_features, out_features, bits, group_size)
    while True:
        try:
            out = _launch(config, x, qweight, scales, zeros, bias, bits, group_size)
        except OUT_OF_RESOURCES:
            fallback = smaller(config)
            if fallback is None:
                raise
            logger.warning("split-K launch %s does not fit this GPU; trying %s", config, fallback)
            config = fallback
            continue
        _FITTED[key] = config
        return out


# The launch that fitted, per (bits, rows bucket, in, out, group size, device): the tuned table is
# measured on an H200, whose 227 KiB of shared memory a smaller GPU may not have.
_FITTED: dict[tuple, KernelConfig] = {}


def smaller(config: KernelConfig) -> KernelConfig | None:
    """The next launch to try when `config` needs more shared memory or registers than the GPU has:
    fewer pipeline stages, then narrower tiles; None when nothing is left to shrink."""
    if config.num_stages > 1:
        return replace(config, num_stages=config.num_stages - 1)
    if config.block_n > 32:
        return replace(config, block_n=config.block_n // 2, num_stages=2)
    if config.block_m > 16:
        return replace(config, block_m=config.block_m // 2, num_stages=2)
    return None


def _launch(config: KernelConfig, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    from engine.quant.splitk_kernel import splitk_gptq_gemv, splitk_gptq_matmul

    rows, in_features = x.shape
    out_features = qweight.shape[1]
    if group_size % config.block_k or in_features % group_size:
        raise ValueError(f"BLOCK_K {config.block_k} must divide the group size {group_size}, and it {in_features}")
    atomic = config.split_k > 1
    out = (torch.zeros if atomic else torch.empty)(rows, out_features, device=x.device, dtype=torch.float32)
    common = dict(BITS=bits, GROUP=group_size, HAS_BIAS=bias is not None, ATOMIC=atomic, BLOCK_N=config.block_n,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    bias_or_any = bias if bias is not None else scales
    if config.block_m <= GEMV_MAX_ROWS:
        grid = (triton_cdiv(out_features, config.block_n), config.split_k, triton_cdiv(rows, config.block_m))
        splitk_gptq_gemv[grid](x, qweight, scales, zeros, bias_or_any, out, rows, out_features, in_features,
                               x.stride(0), out.stride(0), config.split_k, ROWS=config.block_m,
                               BLOCK_WORDS=config.block_k * bits // 32, PAIRS=decodes_in_pairs(x, bits), **common)
    else:
        magic, base = MAGIC.get((x.dtype, bits), (0, 0.0))
        grid = (triton_cdiv(out_features, config.block_n), config.split_k, triton_cdiv(rows, config.block_m))
        splitk_gptq_matmul[grid](x, qweight, scales, zeros, bias_or_any, out, rows, out_features, in_features,
                                 x.stride(0), out.stride(0), config.split_k, MAGIC=magic, MAGIC_BASE=base,
                                 BLOCK_M=config.block_m, BLOCK_K=config.block_k, **common)
    return out


def decodes_in_pairs(x: torch.Tensor, bits: int) -> bool:
    """Whether the GEMV decodes two codes a register in packed bf16 PTX (splitk_kernel.py): 4-bit
    codes under bf16 on a GPU. Triton's interpreter runs no PTX, so the tests' CPU runs take the
    float32 road, and the GPU tests check this one."""
    return bits == 4 and x.dtype == torch.bfloat16 and x.is_cuda


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("vlm_serve::splitk_gptq_matmul", mutates_args=())
def _splitk_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    return splitk_matmul(x, qweight, scales, zeros, bias, bits, group_size)


@_splitk_op.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size):
    return x.new_empty(x.shape[0], qweight.shape[1], dtype=torch.float32)


def kernel_runs_on(x: torch.Tensor) -> bool:
    """Whether the Triton kernel takes `x` here: CUDA in bf16 or fp16, or Triton's interpreter."""
    if x.is_cuda:
        return x.dtype in (torch.bfloat16, torch.float16)
    return os.environ.get("TRITON_INTERPRET") == "1" and x.dtype in (torch.float16, torch.float32)


class SplitKLinear(nn.Module):
    """y = x @ W.T + b with W as `bits`-bit codes in GPTQ's packed layout, per-group scales and zeros."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
        self.register_buffer("qweight", qweight.contiguous())  # int32 [in / p, out]
        self.register_buffer("scales", scales.contiguous())  # [groups, out], the activations' dtype
        self.register_buffer("zeros", zeros.contiguous())  # uint8 [groups, out]
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_weights(cls, weights: GptqWeights, dtype: torch.dtype, device: torch.device) -> SplitKLinear:
        """From unpacked GPTQ weights (any device), for activations of `dtype`."""
        codes = weights.codes.to(device)
        qweight = pack_rows(codes.t().to(torch.int32), weights.bits)
        del codes
        return cls(qweight, weights.scales.t().to(device, dtype).contiguous(),
                   weights.zeros.t().to(device, torch.uint8).contiguous(), weights.bits, weights.group_size,
                   None if weights.bias is None else weights.bias.to(device, dtype))

    def dequantized_t(self) -> torch.Tensor:
        """W.T as [in, out] in the scales' dtype: (code - zero) is a whole number below 256, exact in
        bf16, and one rounding comes after the scale, as bf16 weights have. Plain tensor operations,
        which torch.compile fuses into one kernel in the compiled prompt pass."""
        groups = self.scales.shape[0]
        codes = unpack_rows(self.qweight, self.bits).view(groups, self.group_size, self.out_features)
        weight = (codes.to(self.scales.dtype) - self.zeros.to(self.scales.dtype)[:, None]) * self.scales[:, None]
        return weight.view(self.in_features, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """W as [out, in] in the scales' dtype (for checks)."""
        return self.dequantized_t().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not kernel_runs_on(flat) or flat.shape[0] >= DEQUANTIZE_MIN_ROWS:
            return nn.functional.linear(x, self.dequantized_t().to(x.dtype).t(), self.bias)
        out = _splitk_op(flat.contiguous(), self.qweight, self.scales, self.zeros, self.bias, self.bits,
                         self.group_size)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


def convertible(module: nn.Module) -> str | None:
    """Why a GPTQ layer cannot become a `SplitKLinear` (None: it can)."""
    return unsupported(module, "the split-K kernel", BITS, 16)
