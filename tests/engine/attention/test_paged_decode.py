"""Decode attention over the paged cache: each implementation against plain attention over each
row's own positions, with blocks scattered through the pool in no order. The Triton kernels run
where CUDA is (the GPU machine: `pytest tests/engine/attention`); the gather path everywhere."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from engine.attention.kv_format import PlainLayer
from engine.attention.paged_decode import GatherAttention, decode_attention


def paged_case(rows: int, kv_heads: int, groups: int, head_dim: int, block_size: int, lengths: list[int],
               dtype: torch.dtype, device: str, seed: int = 0, span: int = 0):
    """Random queries and a pool whose blocks are handed to rows in a shuffled order; the table wide
    enough for `span` positions (the scratch block past each row's blocks), as the engine's always is."""
    generator = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-(n + 1) // block_size) for n in lengths) + 1
    pool = rows * max_blocks + 1
    cache_k = torch.randn(pool, block_size, kv_heads, head_dim, generator=generator).to(device, dtype)
    cache_v = torch.randn(pool, block_size, kv_heads, head_dim, generator=generator).to(device, dtype)
    order = (torch.randperm(pool - 1, generator=generator) + 1).view(rows, max_blocks)
    table = torch.zeros(rows, max(max_blocks + 2, span // block_size), dtype=torch.long)
    table[:, :max_blocks] = order
    q = torch.randn(rows, kv_heads, groups, head_dim, generator=generator).to(device, dtype)
    return q, cache_k, cache_v, table.to(device), torch.tensor(lengths, device=device)


def reference(q, cache_k, cache_v, table, lengths, scale) -> torch.Tensor:
    """Row by row: its positions 0..length read through its table, then plain attention (float32)."""
    block_size = cache_k.shape[1]
    out = []
    for r in range(q.shape[0]):
        positions = torch.arange(int(lengths[r]) + 1, device=q.device)
        blocks = table[r, positions // block_size]
        keys = cache_k[blocks, positions % block_size].float().transpose(0, 1)  # [kv_heads, n, D]
        values = cache_v[blocks, positions % block_size].float().transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[r].float(), keys, values, scale=scale))
    return torch.stack(out)


@pytest.mark.parametrize("lengths", [[0, 5, 16, 40], [33], [63, 64, 65]])
def test_gather_attention_is_plain_attention_over_each_rows_blocks(lengths: list[int]) -> None:
    q, k, v, table, n = paged_case(len(lengths), 2, 3, 8, 16, lengths, torch.float32, "cpu")
    got = GatherAttention()(q, PlainLayer(k, v), table, n, 96, 0.3)
    torch.testing.assert_close(got, reference(q, k, v, table, n, 0.3), atol=1e-5, rtol=1e-5)


def test_auto_is_the_gather_path_off_cuda() -> None:
    assert isinstance(decode_attention("auto", torch.device("cpu")), GatherAttention)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        decode_attention("triton", torch.device("cpu"))


cuda_triton = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                 reason="the Triton kernels need CUDA")


@cuda_triton
@pytest.mark.parametrize(("rows", "kv_heads", "groups", "block_size", "lengths", "span"), [
    (1, 2, 16, 16, [0], 256),
    (1, 2, 16, 16, [399], 512),  # GLM-4.6V-Flash's heads; many splits for one row
    (4, 2, 16, 16, [3, 100, 255, 17], 256),
    (32, 2, 16, 16, [i * 37 % 500 for i in range(32)], 512),
    (3, 4, 4, 8, [7, 64, 130], 256),  # fewer query heads per kv head than a dot's minimum (padded)
    (2, 1, 8, 32, [1000, 2047], 2048),
])
def test_triton_kernels_equal_attention_over_each_rows_blocks(rows, kv_heads, groups, block_size, lengths,
                                                              span) -> None:
    from engine.attention.triton_decode import TritonPagedAttention

    q, k, v, table, n = paged_case(rows, kv_heads, groups, 128, block_size, lengths, torch.bfloat16, "cuda",
                                   span=span)
    scale = 128 ** -0.5
    got = TritonPagedAttention()(q, PlainLayer(k, v), table, n, span, scale)
    torch.testing.assert_close(got.float(), reference(q, k, v, table, n, scale), atol=2e-2, rtol=2e-2)
    gathered = GatherAttention()(q, PlainLayer(k, v), table, n, span, scale)
    torch.testing.assert_close(got.float(), gathered.float(), atol=2e-2, rtol=2e-2)


@cuda_triton
def test_triton_kernels_run_inside_a_compiled_captured_step() -> None:
    from engine.attention.triton_decode import TritonPagedAttention

    q, k, v, table, n = paged_case(8, 2, 16, 128, 16, [50] * 8, torch.bfloat16, "cuda")
    attention = torch.compile(lambda q, k, v, *a: TritonPagedAttention()(q, PlainLayer(k, v), *a, 256, 0.1) * 2,
                              dynamic=True)
    expected = attention(q, k, v, table, n)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v, table, n)
    graph.replay()
    torch.testing.assert_close(out, expected)


INTERPRETED = """
import torch
from engine.attention.triton_decode import paged_decode_attention
from tests.engine.attention.test_paged_decode import paged_case, reference
for rows, kv_heads, groups, block_size, lengths, span in [(1, 2, 16, 16, [399], 512), (3, 4, 4, 8, [7, 64, 130], 256)]:
    q, k, v, table, n = paged_case(rows, kv_heads, groups, 128, block_size, lengths, torch.float32, "cpu")
    error = (paged_decode_attention(q, k, v, table, n, span, 0.09) - reference(q, k, v, table, n, 0.09)).abs().max()
    assert error < 1e-4, (lengths, float(error))
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel tests run instead")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_in_tritons_interpreter_on_the_cpu() -> None:
    """The kernels' logic (splits, online softmax, block addressing, GQA padding) checked anywhere
    Triton installs, by its interpreter, in float32; the GPU tests above check them compiled."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    # The project first, then whatever the caller's environment adds (the GPU machine's site).
    python_path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path},
                          check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
