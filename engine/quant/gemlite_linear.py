"""GPTQ 4- and 8-bit linear layers on gemlite's Triton kernels (CUDA).

gemlite (github.com/dropbox/gemlite; torchao and SGLang use it for int4) multiplies bf16 activations
by group-quantized integer weights without ever making a float copy of them: a GEMV that splits the
input dimension for one to four rows, split-K GEMMs up to 64 rows, plain tiled GEMMs beyond,
each autotuned per shape. Its entry point is a torch custom op with a fake implementation, so the
continuous engine's torch.compile'd, CUDA-graph-captured decode step calls it like any operator.
The autotuning runs at a shape's first call, which the engine's warm-up makes before any capture.

Held once: the checkpoint's codes are repacked into gemlite's layout at load, and the GPTQ buffers
are dropped. Fusing a layer's q, k and v projections (engine/quant/repack.py) happens on the
unpacked codes, before gemlite packs them, so the fused layer is again the only copy.

gemlite reads the GPU's name at import time (to pick its tuned configurations), so it is imported
only where a CUDA device is present. Its tables cover the H100; a Hopper GPU it does not name (the
H200) gets the H100's, which the two share the architecture of, rather than tuning every shape
from scratch.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from torch import nn

from engine.quant.gptq_layout import GptqWeights
from engine.quant.repack import unsupported

logger = logging.getLogger("ray.serve")

BITS = (4, 8)


def available() -> bool:
    """Whether gemlite can run here: installed, with a CUDA device."""
    return torch.cuda.is_available() and importlib.util.find_spec("gemlite") is not None


_configured = False


def _gemlite():
    """The gemlite package, its tuned configurations loaded once (see the module docstring)."""
    global _configured
    import gemlite
    from gemlite.core import GemLiteLinearTriton, get_default_cache_config

    if not _configured:
        _configured = True
        if get_default_cache_config() is None and torch.cuda.get_device_capability() == (9, 0):
            path = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
            if GemLiteLinearTriton.load_config(path):
                logger.info("gemlite: no tuned configurations for %s; loaded the H100's",
                            torch.cuda.get_device_name())
    return gemlite


class GemliteLinear(nn.Module):
    """y = x @ W.T + b with W as `bits`-bit codes with per-group scales and zeros, in gemlite's layout."""

    def __init__(self, layer: nn.Module, in_features: int, out_features: int, bits: int) -> None:
        super().__init__()
        self.layer = layer  # a gemlite GemLiteLinearTriton
        self.in_features, self.out_features, self.bits = in_features, out_features, bits

    @classmethod
    @torch.no_grad()
    def from_weights(cls, weights: GptqWeights, dtype: torch.dtype, device: torch.device) -> GemliteLinear:
        """From unpacked GPTQ weights (any device), for activations of `dtype` (bf16 or fp16)."""
        from gemlite.helper import A16Wn_HQQ_INT

        _gemlite()
        # gemlite's "HQQ" form is w = (code - zero) * scale, GPTQ's own.
        layer = A16Wn_HQQ_INT(device=str(device), dtype=dtype, W_nbits=weights.bits).from_weights(
            weights.codes.to(device), weights.scales.to(device, dtype), weights.zeros.to(device, dtype),
            bias=None if weights.bias is None else weights.bias.to(device, dtype))
        return cls(layer, weights.in_features, weights.out_features, weights.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def convertible(module: nn.Module) -> str | None:
    """Why a GPTQ layer cannot go to gemlite (None: it can)."""
    return unsupported(module, "gemlite", BITS, 32)
