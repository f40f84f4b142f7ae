"""How keys and values sit in the paged KV cache: the model's dtype, or int8 codes with scales.

One layer's cache is a small NamedTuple of tensors (`PlainLayer`, `Int8Layer`), so the compiled
decoder layers take it as one argument (dynamo traces tuples of tensors as it does tensors). Its
`KVFormat` is what writes to it and reads it back:
- `PlainKV`: keys and values [num_blocks, block_size, kv_heads, head_dim] in the model's dtype;
- `Int8KV`: the same shape in int8 codes, plus a float32 scale [num_blocks, block_size, kv_heads]
  per position and head for each (engine/attention/kv_int8.py has the format and why).
Position p of a sequence is at [table[p // block_size], p % block_size] in every tensor (blocks.py).
Tokens, then heads, as the projections lay them out: a row's block run gathered by its table is
already [positions, kv_heads, head_dim], which attention reads as a heads-first view without a copy.

`KV_FORMATS` maps the `quantization.kv_cache` setting to a format; 'int4' has none (generate() only).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from engine.attention import kv_int8


class PlainLayer(NamedTuple):
    keys: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim], the model's dtype
    values: torch.Tensor


class Int8Layer(NamedTuple):
    keys: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim] int8 codes
    values: torch.Tensor
    key_scales: torch.Tensor  # [num_blocks, block_size, kv_heads] float32
    value_scales: torch.Tensor


LayerCache = PlainLayer | Int8Layer


class KVFormat(ABC):
    """One layout of a layer's paged keys and values. `store` and `load` run inside the compiled,
    CUDA-graph-captured decode step and the compiled prefill layers: device work only, no host reads,
    no data-dependent shapes."""

    @abstractmethod
    def allocate(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> LayerCache:
        """One layer's cache, zero-filled (rows of a step that are not live attend over the scratch
        block, and garbage there would make their ignored outputs NaN). `dtype`: the model's."""

    @abstractmethod
    def token_bytes(self, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one position takes in one layer, keys and values (scales included)."""

    @abstractmethod
    def store(self, cache: LayerCache, blocks: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Write `keys` and `values` [*index, kv_heads, head_dim] (the model's dtype) in place at
        positions (blocks[i], offsets[i]) for every index i of `blocks` and `offsets` (same shape)."""

    @abstractmethod
    def load(self, cache: LayerCache, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of blocks `blocks` [rows, n], heads first, in `dtype`:
        [rows, kv_heads, n * block_size, head_dim] each (one gather; the heads-first view is free)."""


class PlainKV(KVFormat):
    """Keys and values as the projections give them, in the model's dtype."""

    def allocate(self, num_blocks, block_size, kv_heads, head_dim, dtype, device) -> PlainLayer:
        shape = (num_blocks, block_size, kv_heads, head_dim)
        return PlainLayer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def token_bytes(self, kv_heads, head_dim, dtype) -> int:
        return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, cache: PlainLayer, blocks, offsets, keys, values) -> None:
        cache.keys[blocks, offsets] = keys
        cache.values[blocks, offsets] = values

    def load(self, cache: PlainLayer, blocks, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # .to: no copy where the cache is in `dtype` already, as it is in the model's.
        return heads_first(cache.keys[blocks]).to(dtype), heads_first(cache.values[blocks]).to(dtype)


class Int8KV(KVFormat):
    """Symmetric int8 codes, a float32 scale per position and head (engine/attention/kv_int8.py):
    quantized as they are written, dequantized as they are read."""

    def allocate(self, num_blocks, block_size, kv_heads, head_dim, dtype, device) -> Int8Layer:
        shape = (num_blocks, block_size, kv_heads)

        def codes() -> torch.Tensor:
            return torch.zeros((*shape, head_dim), dtype=torch.int8, device=device)

        def scales() -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        return Int8Layer(codes(), codes(), scales(), scales())

    def token_bytes(self, kv_heads, head_dim, dtype) -> int:
        return 2 * kv_heads * (head_dim + 4)

    def store(self, cache: Int8Layer, blocks, offsets, keys, values) -> None:
        for codes, scales, x in ((cache.keys, cache.key_scales, keys), (cache.values, cache.value_scales, values)):
            quantized, scale = kv_int8.quantize(x)
            codes[blocks, offsets] = quantized
            scales[blocks, offsets] = scale

    def load(self, cache: Int8Layer, blocks, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (heads_first(kv_int8.dequantize(cache.keys[blocks], cache.key_scales[blocks], dtype)),
                heads_first(kv_int8.dequantize(cache.values[blocks], cache.value_scales[blocks], dtype)))


def heads_first(gathered: torch.Tensor) -> torch.Tensor:
    """[rows, n, block_size, kv_heads, head_dim] gathered blocks as [rows, kv_heads, n * block_size, head_dim]."""
    rows, count, block_size, kv_heads, head_dim = gathered.shape
    return gathered.view(rows, count * block_size, kv_heads, head_dim).transpose(1, 2)


KV_FORMATS: dict[str, KVFormat] = {"none": PlainKV(), "int8": Int8KV()}
