"""The int8 KV cache: its number format, its paged store and load, and decode attention over it (the
gather path everywhere, the Triton kernel by Triton's interpreter on the CPU and compiled on CUDA)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.attention.kv_format import KV_FORMATS, Int8Layer
from engine.attention.kv_int8 import MIN_SCALE, QMAX, dequantize, quantize
from engine.attention.paged_decode import GatherAttention
from tests.engine.attention.test_paged_decode import paged_case, reference

INT8 = KV_FORMATS["int8"]


def test_a_round_trip_is_within_half_a_scale_and_zeros_stay_zero() -> None:
    x = torch.randn(4, 7, 2, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 32)
    x[1, 2, 0] = 0.0  # a whole zero vector
    x[2, :, 1, 5] = 0.0  # zero elements among others
    codes, scales = quantize(x.to(torch.bfloat16))
    # The layout: int8 codes shaped as x, one float32 scale per vector of the last dimension.
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    absmax = x.to(torch.bfloat16).float().abs().amax(-1)
    torch.testing.assert_close(scales, (absmax / QMAX).clamp(min=MIN_SCALE))
    assert codes.abs().max() == QMAX and (codes.abs().amax(-1)[absmax > 0] == QMAX).all()
    back = dequantize(codes, scales, torch.float32)
    error = (back - x.to(torch.bfloat16).float()).abs()
    assert (error <= scales[..., None] / 2 * (1 + 1e-5)).all()
    assert scales[1, 2, 0] == MIN_SCALE and (back[1, 2, 0] == 0).all() and (back[2, :, 1, 5] == 0).all()
    assert dequantize(codes, scales, torch.bfloat16).dtype == torch.bfloat16


def int8_case(rows: int, kv_heads: int, groups: int, head_dim: int, block_size: int, lengths: list[int],
              dtype: torch.dtype, device: str):
    """`paged_case`'s queries, table and lengths, its keys and values written into an int8 cache through
    `Int8KV.store` (every position of every block), and those keys and values as the cache gives them back."""
    q, k, v, table, n = paged_case(rows, kv_heads, groups, head_dim, block_size, lengths, dtype, device)
    pool = k.shape[0]
    cache = INT8.allocate(pool, block_size, kv_heads, head_dim, dtype, torch.device(device))
    blocks = torch.arange(pool, device=device)[:, None].expand(pool, block_size)
    offsets = torch.arange(block_size, device=device)[None, :].expand(pool, block_size)
    INT8.store(cache, blocks, offsets, k, v)
    every = torch.arange(pool, device=device)[None, :]
    keys, values = (t.transpose(1, 2).reshape(pool, block_size, kv_heads, head_dim)
                    for t in INT8.load(cache, every, dtype))
    return q, cache, table, n, (k, v), (keys, values)


def test_store_and_load_go_through_the_paged_layout() -> None:
    _, cache, _, _, (k, v), (keys, values) = int8_case(2, 2, 2, 16, 4, [5, 9], torch.float32, "cpu")
    assert isinstance(cache, Int8Layer) and cache.keys.dtype == torch.int8 and cache.key_scales.shape == (k.shape[:3])
    torch.testing.assert_close(keys, dequantize(*quantize(k), torch.float32))
    assert ((values - v).abs() <= cache.value_scales[..., None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("lengths", [[0, 5, 16, 40], [63, 64, 65]])
def test_gather_attention_over_int8_is_attention_over_the_dequantized_cache(lengths: list[int]) -> None:
    q, cache, table, n, full, dequantized = int8_case(len(lengths), 2, 3, 32, 16, lengths, torch.float32, "cpu")
    got = GatherAttention(INT8)(q, cache, table, n, 96, 0.2)
    torch.testing.assert_close(got, reference(q, *dequantized, table, n, 0.2), atol=1e-5, rtol=1e-5)
    # ... and near attention over what was written: int8 keeps about two decimal digits.
    torch.testing.assert_close(got, reference(q, *full, table, n, 0.2), atol=2e-2, rtol=0)


# (rows, kv_heads, groups, block_size, lengths, span): spans within paged_case's table width.
CASES = [
    (1, 2, 16, 16, [399], 448),  # GLM-4.6V-Flash's heads; one row over 25 blocks, many splits
    (3, 4, 4, 8, [7, 64, 130], 160),  # rows of different lengths; fewer query heads than a dot's minimum
    (4, 1, 8, 16, [0, 15, 16, 47], 64),  # a row at its first position, rows ending on a block's edge
]

INTERPRETED = f"""
import torch
from engine.attention.kv_format import KV_FORMATS
from engine.attention.paged_decode import GatherAttention
from engine.attention.triton_decode import TritonPagedAttention
from tests.engine.attention.test_kv_int8 import int8_case
for rows, kv_heads, groups, block_size, lengths, span in {CASES!r}:
    q, cache, table, n, _, _ = int8_case(rows, kv_heads, groups, 64, block_size, lengths, torch.float32, "cpu")
    got = TritonPagedAttention(KV_FORMATS["int8"])(q, cache, table, n, span, 0.125)
    error = (got - GatherAttention(KV_FORMATS["int8"])(q, cache, table, n, span, 0.125)).abs().max()
    assert error < 1e-4, (lengths, float(error))
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel tests run instead")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_int8_triton_kernel_in_tritons_interpreter_equals_the_gather_path() -> None:
    """The INT8 variant's scales (key scales on the scores, value scales on the weights), its code
    loads and its addressing, by Triton's interpreter in float32; the GPU test below checks it compiled."""
    root = Path(__file__).resolve().parents[3]
    # The project first, then whatever the caller's environment adds (the GPU machine's site).
    python_path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path},
                          check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


cuda_triton = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                 reason="the Triton kernels need CUDA")


@cuda_triton
@pytest.mark.parametrize(("rows", "kv_heads", "groups", "block_size", "lengths", "span"), [
    *CASES, (32, 2, 16, 16, [i * 37 % 500 for i in range(32)], 512),
])
def test_the_int8_triton_kernel_equals_the_gather_path_on_cuda(rows, kv_heads, groups, block_size, lengths,
                                                               span) -> None:
    from engine.attention.triton_decode import TritonPagedAttention

    q, cache, table, n, _, dequantized = int8_case(rows, kv_heads, groups, 128, block_size, lengths, torch.bfloat16,
                                                   "cuda")
    got = TritonPagedAttention(INT8)(q, cache, table, n, span, 128 ** -0.5)
    torch.testing.assert_close(got.float(), reference(q, *dequantized, table, n, 128 ** -0.5), atol=2e-2, rtol=2e-2)

    attention = torch.compile(lambda q, *cache: TritonPagedAttention(INT8)(q, Int8Layer(*cache), table, n, span, 0.1),
                              dynamic=True)
    expected = attention(q, *cache)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, *cache)
    graph.replay()
    torch.testing.assert_close(out, expected)
