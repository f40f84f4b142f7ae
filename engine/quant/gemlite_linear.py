"""GPTQ 4- and 8-bit linear layers on gemlite's Triton kernels (CUDA).

gemlite (github.com/dropbox/gemlite; torchao and SGLang use it for int4) multiplies bf16 activations
by group-quantized integer weights without ever making a float copy of them: a GEMV that splits the
input dimension for one to four rows, split-K GEMMs up to 64 rows, plain tiled GEMMs beyond,
each autotuned per shape. Its entry point is a torch custom op with a fake implementation, so the
continuous engine's torch.compile'd, CUDA-graph-captured decode step calls it like any operator.
The autotuning runs at a shape's first call, which the engine's warm-up makes before any capture.

Held once: the checkpoint's codes are repacked into gemlite's layout at load, and the GPTQ buffers
are dropped. Fusing a layer's q, k and v projections (the decoder does, for one kernel where three
small ones ran) happens on the unpacked codes, before gemlite packs them, so the fused layer is
again the only copy; the three separate modules it replaces then call it and take their slice.

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

from engine.quant.gptq_layout import GptqWeights, gptq_bits, is_gptq_layer, plain_group_order

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


class OutputSlice(nn.Module):
    """One of the layers a fused layer replaced: the fused layer's output columns start..stop-1.
    Only transformers' own forward (the generate() engine) calls these; the continuous engine calls
    the fused layer once."""

    def __init__(self, fused: GemliteLinear, start: int, stop: int) -> None:
        super().__init__()
        self.fused, self.start, self.stop = fused, start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.stop]


def convertible(module: nn.Module) -> str | None:
    """Why a GPTQ layer cannot go to gemlite (None: it can)."""
    bits = gptq_bits(module)
    if bits not in BITS:
        return f"{bits} bits (gemlite takes {' or '.join(map(str, BITS))} here)"
    in_features = module.g_idx.shape[0]
    groups = module.scales.shape[0]
    group_size = in_features // groups
    if group_size * groups != in_features or group_size % 32:
        return f"group size {in_features}/{groups} (gemlite takes multiples of 32)"
    if not plain_group_order(module, group_size):
        return "permuted groups (desc_act)"
    return None


# Sibling projections that read the same input, fused into one layer (the decoder's attention).
FUSED_SIBLINGS = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


def repack_gptq(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Replace every GPTQ layer of `model` that gemlite takes by a `GemliteLinear` for activations of
    `dtype`, fusing each attention's q, k and v into a `qkv_proj` (see the module docstring); returns
    how many GPTQ layers were replaced. The others keep their module, with a warning."""
    replaced = 0
    for parent in list(model.modules()):
        for fused_name, names in FUSED_SIBLINGS.items():
            siblings = [getattr(parent, name, None) for name in names]
            if all(s is not None and is_gptq_layer(s) and convertible(s) is None for s in siblings):
                parts = [GptqWeights.from_module(s) for s in siblings]
                fused = GemliteLinear.from_weights(GptqWeights.concat(parts), dtype, device)
                setattr(parent, fused_name, fused)
                start = 0
                for name, part in zip(names, parts):
                    setattr(parent, name, OutputSlice(fused, start, start + part.out_features))
                    start += part.out_features
                replaced += len(names)
        for name, child in list(parent.named_children()):
            if not is_gptq_layer(child):
                continue
            reason = convertible(child)
            if reason is not None:
                logger.warning("%s stays on gptqmodel's kernel: %s", name, reason)
                continue
            setattr(parent, name, GemliteLinear.from_weights(GptqWeights.from_module(child), dtype, device))
            replaced += 1
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the GPTQ buffers just dropped, before the next layer's repack
    return replaced
