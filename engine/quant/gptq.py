"""What the engine passes to transformers for quantized weights and a quantized KV cache.

Small functions, no globals, no environment:
- `load_kwargs(source, device, settings)`: extra `from_pretrained` kwargs. For a GPTQ checkpoint
  (`quantization_config.quant_method == "gptq"` in its config.json) it picks gptqmodel's kernel
  for the device and bit width, and places the model on the device while loading (gptqmodel
  picks and builds its kernel at load time, for the device it is loaded on). Empty for float
  checkpoints.
- `prepare_model(model, source, device, settings)`: what a loaded GPTQ checkpoint needs before
  serving: its layers handed to one of our kernels (`splitk`, `tinygemm`, `gemlite`) where that is
  the backend.
- `generation_kwargs(settings)`: extra `GenerationConfig` fields: the quantized KV cache.

Kernels ("auto"):
- CPU, 8 bits: `gptq_torch_int8` (aten's `_weight_int8pack_mm`; float32/bf16/fp16).
- CPU, 4 bits: `gptq_torch_fused` (aten's `_weight_int4pack_mm_for_cpu`).
  Both are plain PyTorch ops: nothing is compiled at load time. gptqmodel's own CPU "auto" choice
  JIT-builds a C++ extension and torch.compile's the dequantizer (minutes on a small machine).
- CUDA, 4 or 8 bits: `splitk`, ours (engine/quant/splitk_linear.py): the checkpoint loads through
  gptqmodel's plain `torch` kernel and every layer is then handed to our split-K Triton kernel on
  the checkpoint's own packed layout (one copy of the weights), which runs inside the continuous
  engine's compiled, graph-captured decode step. On the H200 it serves one sequence 1.34x (4 bits)
  and 1.15x (8 bits) faster than bf16 (benchmarks/RESULTS.md).
- CUDA, 4 bits, when asked (`gptq_backend: tinygemm`): PyTorch's own int4 matmul
  (engine/quant/int4_linear.py): faster than `splitk` at 2 to 4 rows, much slower from 16, and it
  keeps a second plain copy of the codes.
- CUDA, 8 bits, when asked (`gptq_backend: marlin`): gptqmodel builds the Marlin extension with nvcc
  on first use on each machine and caches it under ~/.cache/gptqmodel. `triton` is gptqmodel's
  Triton kernel.
- CUDA, 4 or 8 bits, when asked (`gptq_backend: gemlite`): gemlite's Triton kernels
  (engine/quant/gemlite_linear.py), one copy of the weights, in the captured step; slower than
  `splitk` on the H200.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from serve_app.settings import QuantizationSettings

logger = logging.getLogger("ray.serve")

# Our names -> gptqmodel's BACKEND values (tinygemm: load the plain layout, repack after).
GPTQ_BACKENDS: dict[str, str] = {
    "tinygemm": "gptq_torch",
    "gemlite": "gptq_torch",
    "splitk": "gptq_torch",
    "torch": "gptq_torch",
    "torch_int8": "gptq_torch_int8",
    "torch_fused": "gptq_torch_fused",
    "marlin": "gptq_marlin",
    "triton": "gptq_triton",
    "exllama_v2": "gptq_exllama_v2",
}


def checkpoint_quantization(source: str | Path) -> dict[str, Any] | None:
    """The `quantization_config` of a checkpoint's config.json (local dir or hub id), or None."""
    local = Path(source)
    if local.is_dir():
        path = local / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        return config.get("quantization_config")
    from transformers import AutoConfig

    quant = getattr(AutoConfig.from_pretrained(str(source)), "quantization_config", None)
    if quant is None:
        return None
    return quant if isinstance(quant, dict) else quant.to_dict()


def gptq_backend(bits: int, device: torch.device, requested: str = "auto") -> str:
    """Our backend name (a GPTQ_BACKENDS key, or "auto": gptqmodel's choice) for `bits` on `device`."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "splitk"
    if device.type == "cpu":
        return "torch_int8" if bits == 8 else "torch_fused" if bits == 4 else "torch"
    return "auto"  # xpu, mps, ...: let gptqmodel choose


def _checkpoint_backend(source: str | Path, device: torch.device, settings: QuantizationSettings) -> str | None:
    """The backend a GPTQ checkpoint loads with on `device` (None: not a GPTQ checkpoint)."""
    quant = checkpoint_quantization(source)
    if not quant or str(quant.get("quant_method", "")).lower() != "gptq":
        return None
    return gptq_backend(int(quant.get("bits", 4)), device, settings.gptq_backend)


def load_kwargs(
    source: str | Path, device: torch.device | str, settings: QuantizationSettings | None = None
) -> dict[str, Any]:
    """Extra kwargs for `AutoModelForImageTextToText.from_pretrained(source, dtype=..., **kwargs)`."""
    settings = settings or QuantizationSettings()
    device = torch.device(device)
    backend = _checkpoint_backend(source, device, settings)
    if backend is None:
        return {}
    from transformers import GPTQConfig

    bits = int(checkpoint_quantization(source).get("bits", 4))
    # Only the loading attributes (backend) of this config are used; the rest comes from config.json.
    kwargs: dict[str, Any] = {"quantization_config": GPTQConfig(bits=bits, backend=GPTQ_BACKENDS.get(backend, backend))}
    if device.type != "cpu":
        index = device.index if device.index is not None else 0
        kwargs["device_map"] = {"": f"{device.type}:{index}"}
    return kwargs


def prepare_model(model: torch.nn.Module, source: str | Path, device: torch.device | str,
                  settings: QuantizationSettings | None = None) -> None:
    """What a loaded checkpoint needs before serving: GPTQ layers repacked for one of our kernels,
    where that is the backend (in place; nothing for other checkpoints)."""
    settings = settings or QuantizationSettings()
    repack(model, _checkpoint_backend(source, torch.device(device), settings), torch.device(device))


def repack(model: torch.nn.Module, backend: str | None, device: torch.device) -> int:
    """Repack `model`'s GPTQ layers for `backend` where it is one of ours (tinygemm, gemlite, splitk); returns
    how many were repacked (0 for gptqmodel's own backends)."""
    if backend == "tinygemm":
        from engine.quant.int4_linear import repack_gptq

        # tinygemm takes bf16 activations on CUDA; the CPU kernel also takes the model's float32.
        count = repack_gptq(model, model.dtype if device.type == "cpu" else torch.bfloat16)
    elif backend in ("gemlite", "splitk"):
        if device.type != "cuda":
            raise ValueError(f"gptq_backend '{backend}' needs a CUDA device")
        from engine.quant.repack import repack_layers

        if backend == "gemlite":
            from engine.quant.gemlite_linear import GemliteLinear as layer
            from engine.quant.gemlite_linear import convertible
        else:
            from engine.quant.splitk_linear import SplitKLinear as layer
            from engine.quant.splitk_linear import convertible
        # Each attention's q, k and v become one layer (engine/quant/repack.py).
        dtype = torch.bfloat16 if model.dtype == torch.float32 else model.dtype
        count = repack_layers(model, layer, convertible, dtype, device)
    else:
        return 0
    logger.info("Repacked %d GPTQ layers for %s", count, backend)
    return count


def generation_kwargs(settings: QuantizationSettings | None = None) -> dict[str, Any]:
    """Extra `GenerationConfig(...)` fields: a quantized KV cache when `kv_cache` asks for one."""
    settings = settings or QuantizationSettings()
    if settings.kv_cache == "none":
        return {}
    return {
        "cache_implementation": "quantized",
        "cache_config": {
            "backend": "hqq",  # quanto only offers 2 and 4 bits
            "nbits": 8 if settings.kv_cache == "int8" else 4,
            "axis_key": 1,
            "axis_value": 1,
            "q_group_size": settings.kv_cache_group_size,
            "residual_length": settings.kv_cache_residual_length,
        },
    }


def describe(settings: QuantizationSettings | None, weights: str) -> str:
    """`weights` (e.g. 'gptq-4bit' from the engine) plus the KV cache, for `/v1/models`."""
    settings = settings or QuantizationSettings()
    return weights if settings.kv_cache == "none" else f"{weights}+kv-{settings.kv_cache}"


def describe_quantization(config: object) -> str:
    """'gptq-8bit' for a checkpoint's quantization config (dict or transformers config object).

    transformers' `to_dict()` keeps `quant_method` as a `QuantizationMethod` enum, whose str() is
    'QuantizationMethod.GPTQ'; this reads the enum's value.
    """
    as_dict = config if isinstance(config, dict) else getattr(config, "to_dict", dict)()
    method = as_dict.get("quant_method", "unknown")
    method = str(getattr(method, "value", method)).lower()
    bits = as_dict.get("bits")
    return f"{method}-{bits}bit" if bits else method
