"""Replacing a model's GPTQ layers by one of our kernels' layers, q/k/v fused into one.

Shared by the kernels that take unpacked GPTQ weights (gemlite_linear.py, splitk_linear.py). Each
attention's q, k and v projections read the same input, so they become one `qkv_proj` layer (one
kernel where three ran, the small k and v ones far from the memory bandwidth); the three modules
it replaces stay as `OutputSlice`s of it, for transformers' own forward (the generate() engine).
The continuous engine's decoder calls the fused layer once (engine/models/glm4v/decoder.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from engine.quant.gptq_layout import GptqWeights, gptq_bits, is_gptq_layer, plain_group_order

logger = logging.getLogger("ray.serve")

# Sibling projections that read the same input, fused into one layer (the decoder's attention).
FUSED_SIBLINGS = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


class OutputSlice(nn.Module):
    """One of the layers a fused layer replaced: the fused layer's output columns start..stop-1."""

    def __init__(self, fused: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.fused, self.start, self.stop = fused, start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.stop]


def unsupported(module: nn.Module, kernel: str, bits: tuple[int, ...], group_multiple: int) -> str | None:
    """Why a GPTQ layer's layout is not one `kernel` takes (None: it is): `bits` wide codes, groups
    of a multiple of `group_multiple` input columns, in their plain order."""
    width = gptq_bits(module)
    if width not in bits:
        return f"{width} bits ({kernel} takes {' or '.join(map(str, bits))} here)"
    in_features = module.g_idx.shape[0]
    groups = module.scales.shape[0]
    group_size = in_features // groups
    if group_size * groups != in_features or group_size % group_multiple:
        return f"group size {in_features}/{groups} ({kernel} takes multiples of {group_multiple})"
    if not plain_group_order(module, group_size):
        return "permuted groups (desc_act)"
    return None


class PackedLayer(Protocol):
    """A layer class of one of our kernels, made from unpacked GPTQ weights."""

    @classmethod
    def from_weights(cls, weights: GptqWeights, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """The layer on `device` for activations of `dtype`, holding its own packing of `weights`."""
        ...


def repack_layers(model: nn.Module, layer: type[PackedLayer], convertible: Callable[[nn.Module], str | None],
                  dtype: torch.dtype, device: torch.device) -> int:
    """Replace every GPTQ layer of `model` that `convertible` accepts (it returns None, or why not)
    by `layer.from_weights(its unpacked weights, dtype, device)`, fusing sibling projections (see the
    module docstring); returns how many GPTQ layers were replaced. The others keep their module, with
    a warning."""

    def make_layer(weights: GptqWeights) -> nn.Module:
        return layer.from_weights(weights, dtype, device)

    replaced = 0
    for parent in list(model.modules()):
        for fused_name, names in FUSED_SIBLINGS.items():
            siblings = [getattr(parent, name, None) for name in names]
            if all(s is not None and is_gptq_layer(s) and convertible(s) is None for s in siblings):
                parts = [GptqWeights.from_module(s) for s in siblings]
                fused = make_layer(GptqWeights.concat(parts))
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
            setattr(parent, name, make_layer(GptqWeights.from_module(child)))
            replaced += 1
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the GPTQ buffers just dropped, before the next layer's repack
    return replaced
