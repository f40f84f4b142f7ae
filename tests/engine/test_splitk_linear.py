"""GPTQ layers on our split-K Triton kernel (engine/quant/splitk_linear.py, splitk_kernel.py).

The kernel itself runs here twice: under Triton's interpreter on the CPU (in a child process, since
the interpreter is chosen when Triton compiles a kernel, from the environment; fp16 and float32,
the interpreter has no bf16), and on a CUDA GPU in bf16 where there is one. Both check it against
the dequantized GPTQ weights, across bit widths, row counts, split-K shares, bias and odd sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.common import GPTQLinear
from engine.quant.gptq_layout import GptqWeights, pack_rows, unpack_rows
from engine.quant.repack import OutputSlice, repack_layers
from engine.quant.splitk_linear import KernelConfig, SplitKLinear, config_for, convertible, splitk_matmul

ROOT = Path(__file__).resolve().parents[2]


def repack_gptq(model: nn.Module) -> int:
    return repack_layers(model, SplitKLinear, convertible, torch.float32, torch.device("cpu"))


def gptq(in_features: int, out_features: int, bits: int = 4, seed: int = 0, group_size: int = 64,
         bias: bool = False) -> GPTQLinear:
    torch.manual_seed(seed)
    return GPTQLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), group_size=group_size, bits=bits)


def test_pack_rows_inverts_unpack_rows() -> None:
    for bits in (4, 8):
        codes = torch.randint(0, 2 ** bits, (256, 24), dtype=torch.int32)
        assert torch.equal(unpack_rows(pack_rows(codes.t().contiguous().t(), bits), bits), codes)
        assert torch.equal(unpack_rows(pack_rows(codes, bits), bits), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_layer_holds_the_checkpoint_codes_once(bits: int) -> None:
    layer = gptq(256, 96, bits)
    weights = GptqWeights.from_module(layer)
    packed = SplitKLinear.from_weights(weights, torch.float32, torch.device("cpu"))
    assert torch.equal(packed.qweight, layer.qweight)  # the checkpoint's own layout
    assert torch.equal(packed.dequantized(), weights.dequantized())
    stored = sum(t.numel() * t.element_size() for t in (packed.qweight, packed.scales, packed.zeros))
    checkpoint = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.qzeros))
    assert stored <= 1.05 * checkpoint + packed.scales.numel() * 2  # float32 scales here; bf16 on the GPU


def test_a_launch_too_big_for_the_gpu_shrinks_until_it_fits_and_is_remembered(monkeypatch) -> None:
    from engine.quant import splitk_linear

    tried: list[KernelConfig] = []

    def launch(config, x, *rest):  # a GPU with little shared memory: one stage and 64 columns at most
        tried.append(config)
        if config.num_stages > 1 or config.block_n > 64:
            raise splitk_linear.OUT_OF_RESOURCES(300_000, 232_448, "shared memory")
        return torch.zeros(x.shape[0], 96)

    monkeypatch.setattr(splitk_linear, "_launch", launch)
    monkeypatch.setattr(splitk_linear, "_FITTED", {})
    monkeypatch.setattr(splitk_linear, "config_for", lambda *a: KernelConfig(16, 256, 64, 4, 4, 3))
    x, words = torch.randn(8, 256), torch.zeros(32, 96, dtype=torch.int32)
    splitk_matmul(x, words, torch.ones(4, 96), torch.zeros(4, 96), None, 4, 64)
    fitted = tried[-1]
    assert (fitted.block_n, fitted.num_stages) == (64, 1) and fitted.split_k == 4 and len(tried) > 3
    tried.clear()
    splitk_matmul(x, words, torch.ones(4, 96), torch.zeros(4, 96), None, 4, 64)
    assert tried == [fitted]  # the next call of that shape starts from what fitted
    with pytest.raises(splitk_linear.OUT_OF_RESOURCES):  # an explicit launch is the caller's to fit
        splitk_matmul(x, words, torch.ones(4, 96), torch.zeros(4, 96), None, 4, 64, KernelConfig(16, 128, 64, 1, 4, 2))
    smallest = KernelConfig(16, 32, 64, 1, 4, 1)
    assert splitk_linear.smaller(smallest) is None  # the shrinking ends


def test_a_prompts_rows_multiply_the_dequantized_weight(monkeypatch) -> None:
    from engine.quant import splitk_linear

    layer = gptq(256, 96, 4, bias=True)
    weights = GptqWeights.from_module(layer)
    packed = SplitKLinear.from_weights(weights, torch.float32, torch.device("cpu"))
    assert torch.equal(packed.dequantized_t(), weights.dequantized().t())
    monkeypatch.setattr(splitk_linear, "kernel_runs_on", lambda x: True)  # as on a GPU
    monkeypatch.setattr(splitk_linear, "_splitk_op", None)  # which a prompt's rows must not reach
    x = torch.randn(splitk_linear.DEQUANTIZE_MIN_ROWS, 256)
    assert torch.allclose(packed(x), x @ weights.dequantized().t() + weights.bias, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_q_k_v_become_one_layer_and_each_projection_its_slice(bits: int) -> None:
    attn = nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = gptq(128, 64, bits, 1), gptq(128, 32, bits, 2), gptq(128, 32, bits, 3)
    attn.o_proj = gptq(64, 128, bits, 4)
    model = nn.Sequential(attn)
    x = torch.randn(3, 128)
    expected = {name: x @ GptqWeights.from_module(getattr(attn, name)).dequantized().t()
                for name in ("q_proj", "k_proj", "v_proj")}
    assert repack_gptq(model) == 4
    assert isinstance(attn.qkv_proj, SplitKLinear) and attn.qkv_proj.out_features == 128
    assert isinstance(attn.o_proj, SplitKLinear)
    for name, want in expected.items():
        layer = getattr(attn, name)
        assert isinstance(layer, OutputSlice) and layer.fused is attn.qkv_proj
        assert torch.allclose(layer(x), want, atol=1e-5)


def test_layers_the_kernel_cannot_take_keep_their_module() -> None:
    three_bits = gptq(128, 32)
    three_bits.bits = 3
    assert "3 bits" in convertible(three_bits)
    odd = GPTQLinear.from_linear(nn.Linear(96, 32, bias=False), group_size=24)
    assert "group size" in convertible(odd)
    permuted = gptq(128, 32)
    permuted.g_idx = permuted.g_idx.flip(0)
    assert "permuted" in convertible(permuted)
    model = nn.Sequential(odd, permuted, gptq(128, 32))
    assert repack_gptq(model) == 1
    assert model[0] is odd and model[1] is permuted and isinstance(model[2], SplitKLinear)


def test_a_tile_across_two_groups_is_refused() -> None:
    layer = SplitKLinear.from_weights(GptqWeights.from_module(gptq(256, 32, group_size=64)), torch.float32,
                                      torch.device("cpu"))
    with pytest.raises(ValueError, match="must divide the group size"):
        splitk_matmul(torch.randn(1, 256), layer.qweight, layer.scales, layer.zeros, None, 4, 64,
                      KernelConfig(16, 32, 128, 1, 4, 2))


@pytest.mark.parametrize("rows", [1, 5, 16, 32, 64, 300])
@pytest.mark.parametrize("shape", [(4096, 4608), (13696, 4096), (512, 96), (384, 40)])
def test_the_rule_of_thumb_gives_launches_the_kernel_takes(rows: int, shape: tuple[int, int]) -> None:
    in_features, out_features = shape
    for group_size in (32, 64, 128):
        if in_features % group_size:
            continue
        config = config_for(rows, in_features, out_features, 4, group_size)
        assert group_size % config.block_k == 0 and config.block_k >= 16
        assert (config.block_m <= 4) == (rows <= 4)  # the GEMV kernel for few rows
        assert config.block_m & (config.block_m - 1) == 0 and (config.block_m >= min(rows, 16) or rows <= 4)
        assert 1 <= config.split_k <= max(1, in_features // config.block_k)


# Row counts, shapes and launches that cross every edge: one row, rows past BLOCK_M, outputs past
# BLOCK_N, more split-K shares than tiles, a bias added once whatever the shares.
CASES = [
    (1, 256, 96, None),
    (5, 512, 96, KernelConfig(16, 32, 64, 3, 4, 2)),
    (33, 512, 200, KernelConfig(32, 64, 64, 1, 4, 2)),
    (3, 256, 64, KernelConfig(16, 64, 64, 8, 4, 2)),  # 8 shares of 4 tiles: some get none
    (70, 384, 64, None),  # a prompt's launch
    (3, 512, 96, KernelConfig(1, 64, 64, 3, 4, 2)),  # the GEMV kernel, split
    (1, 256, 200, KernelConfig(1, 128, 32, 1, 4, 2)),
    (3, 512, 96, KernelConfig(2, 64, 64, 2, 4, 2)),  # two rows a program: the second program's half empty
    (7, 256, 96, KernelConfig(4, 32, 64, 1, 4, 2)),
]

_INTERPRETED = """
import sys, torch
sys.path.insert(0, {root!r})
from engine.quant.gptq_layout import GptqWeights
from engine.quant.splitk_linear import KernelConfig, SplitKLinear, splitk_matmul
torch.manual_seed(0)
worst = 0.0
for bits in (4, 8):
    for dtype in (torch.float16, torch.float32):
        for rows, k, n, config in {cases!r}:
            config = None if config is None else KernelConfig(*config)
            codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
            scales = torch.rand(n, k // 64) * 0.02 + 0.001
            zeros = torch.randint(0, 2 ** bits, (n, k // 64)).float()
            weights = GptqWeights(codes, scales, zeros, bits, 64, torch.randn(n))
            layer = SplitKLinear.from_weights(weights, dtype, torch.device("cpu"))
            x = torch.randn(rows, k).to(dtype)
            want = x.float() @ weights.dequantized().t() + weights.bias
            got = splitk_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.bias, bits, 64, config)
            assert got.dtype == torch.float32 and got.shape == (rows, n)  # shares add in float32
            assert layer(x).dtype == dtype  # the layer hands back the activations' dtype
            error = ((got.float() - want).abs().max() / want.abs().max()).item()
            worst = max(worst, error / (1e-2 if dtype == torch.float16 else 1e-5))
print("worst", worst)
"""


def test_the_kernel_under_tritons_interpreter_matches_the_dequantized_weights() -> None:
    cases = [(rows, k, n, None if c is None else tuple(c.__dict__.values())) for rows, k, n, c in CASES]
    script = _INTERPRETED.format(root=str(ROOT), cases=cases)
    done = subprocess.run([sys.executable, "-c", script], check=False, env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = float(done.stdout.split("worst")[-1])
    assert worst <= 1.0  # every case within 1e-2 (fp16) or 1e-5 (float32) of the largest output


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel runs on CUDA GPUs")


@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_on_the_gpu_the_kernel_matches_the_dequantized_weights(bits: int) -> None:
    layer = gptq(4096, 1152, bits, group_size=128, bias=True).cuda()
    weights = GptqWeights.from_module(layer)
    packed = SplitKLinear.from_weights(weights, torch.bfloat16, torch.device("cuda"))
    reference = weights.dequantized().cuda()
    bias = weights.bias.cuda().float()

    def error(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    # Within bf16's rounding: two of its steps (2**-7) at the largest output. On the H200 this kernel
    # errs by at most 0.44% here and cuBLAS on the bf16 weights by 0.36%; adding split-K shares in
    # bf16, as the kernel once did, erred by 1-1.7%.
    bound = 2 ** -7
    for rows in (1, 7, 16, 32, 64, 100, 600):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ reference.t() + bias
        for config in (None, KernelConfig(16, 128, 128, 8, 4, 4), KernelConfig(64, 64, 64, 2, 8, 3),
                       KernelConfig(1, 256, 128, 4, 4, 3), KernelConfig(4, 128, 64, 8, 4, 2)):
            got = splitk_matmul(x, packed.qweight, packed.scales, packed.zeros, packed.bias, bits, 128, config)
            assert error(got, want) <= bound, (rows, config)
        # The kernel up to DEQUANTIZE_MIN_ROWS rows, cuBLAS on the dequantized weight from there.
        assert error(packed(x), want) <= bound, rows


@cuda
def test_on_the_gpu_the_layer_compiles_into_one_graph_and_replays() -> None:
    packed = SplitKLinear.from_weights(GptqWeights.from_module(gptq(1024, 512, 4, group_size=128).cuda()),
                                       torch.bfloat16, torch.device("cuda"))
    x = torch.randn(4, 1, 1024, device="cuda", dtype=torch.bfloat16)
    want = packed(x)
    compiled = torch.compile(lambda t: packed(t) * 2, fullgraph=True)
    assert torch.allclose(compiled(x), want * 2, atol=1e-2, rtol=1e-2)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        compiled(x)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = compiled(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    # Not elementwise: split-K shares add in whatever order they finish, which moves float32's last
    # bits, and now and then that crosses a bf16 rounding boundary.
    want = packed(x).float() * 2
    assert ((out.float() - want).abs().max() / want.abs().max()).item() < 0.02
