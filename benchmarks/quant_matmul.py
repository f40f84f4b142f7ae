"""Quantized matmul kernels on GLM-4.6V-Flash's decoder shapes, against bf16 cuBLAS (CUDA only).

    python benchmarks/quant_matmul.py --json $OUT/quant_matmul.json
    python benchmarks/quant_matmul.py --rows 1,32 --kernels bf16,gemlite4     # a subset

For each linear shape of a decoder layer (fused q/k/v, o, fused gate/up, down; k alone, to see
what fusing saves) and each row count, every kernel runs `x @ W.T` captured `--calls` times in one
CUDA graph, replayed `--replays` times: the median time per call, the weight bytes it read per
second, and its error against the dequantized weights. Kernels:
- `bf16`: F.linear on bf16 weights (cuBLAS), the baseline of the same call;
- `tinygemm4`: PyTorch's int4 matmul (engine/quant/int4_linear.py; dequantize + cuBLAS over 16 rows);
- `gemlite4`, `gemlite8`: gemlite's kernels (engine/quant/gemlite_linear.py), GPTQ group size 128.
`step_ms`: the four shapes x 40 layers, the decoder's linear time per step at that row count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.quant.gptq_layout import GptqWeights

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4096, 13696, 40, 32, 2, 128
SHAPES = {  # name: (in, out)
    "qkv": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
    "o": (HEADS * HEAD_DIM, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTERMEDIATE),
    "down": (INTERMEDIATE, HIDDEN),
    "k": (HIDDEN, KV_HEADS * HEAD_DIM),
}
STEP_SHAPES = ("qkv", "o", "gate_up", "down")
GROUP = 128


def random_weights(in_features: int, out_features: int, bits: int, seed: int) -> GptqWeights:
    g = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_features, groups, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    zeros = torch.full((out_features, groups), float(2 ** (bits - 1)), dtype=torch.bfloat16)
    return GptqWeights(codes, scales, zeros, bits, GROUP, None)


def tinygemm(weights: GptqWeights):
    from engine.quant.int4_linear import BITS, Int4Linear, _tinygemm_layout

    codes = weights.codes.cuda()
    scales = weights.scales.float().t().cuda()
    offsets = (2 ** (BITS - 1) - weights.zeros.float().t().cuda()) * scales
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    return Int4Linear(_tinygemm_layout(pairs), pairs, torch.stack([scales, offsets], -1).to(torch.bfloat16).contiguous(),
                      GROUP, None)


def make_kernel(kind: str, in_features: int, out_features: int, seed: int):
    """(callable x -> y, reference weight [out, in] float32, weight bytes read per call)."""
    if kind == "bf16":
        w = (torch.randn(out_features, in_features, device="cuda") * 0.02).to(torch.bfloat16)
        return (lambda x: F.linear(x, w)), w.float(), w.numel() * 2
    bits = 8 if kind.endswith("8") else 4
    weights = random_weights(in_features, out_features, bits, seed)
    reference = weights.dequantized().cuda()
    nbytes = weights.codes.numel() * bits // 8 + weights.scales.numel() * 4  # codes + scales and zeros
    if kind.startswith("tinygemm"):
        return tinygemm(weights), reference, nbytes
    from engine.quant.gemlite_linear import GemliteLinear

    return GemliteLinear.from_weights(weights, torch.bfloat16, torch.device("cuda")), reference, nbytes


def time_call(fn, x: torch.Tensor, calls: int, replays: int) -> float:
    """Median seconds per call of fn(x), `calls` of them captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,512,2048")
    parser.add_argument("--kernels", default="bf16,tinygemm4,gemlite4,gemlite8")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    kernels = args.kernels.split(",")
    results = []
    for name, (in_features, out_features) in SHAPES.items():
        for kind in kernels:
            fn, reference, nbytes = make_kernel(kind, in_features, out_features, seed=hash(name) % 1000)
            for rows in rows_list:
                x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    got = fn(x).float()
                    want = x.float() @ reference.t()
                    error = ((got - want).abs().max() / want.abs().max()).item()
                    seconds = time_call(fn, x, args.calls, args.replays)
                results.append({"shape": name, "in": in_features, "out": out_features, "kernel": kind, "rows": rows,
                                "us": seconds * 1e6, "tb_s": nbytes / seconds / 1e12, "rel_error": error})
                print(f"{name:8s} {kind:10s} rows {rows:5d}: {seconds * 1e6:8.1f} us  "
                      f"{nbytes / seconds / 1e12:5.2f} TB/s  err {error:.4f}", flush=True)
            del fn, reference
            torch.cuda.empty_cache()
    summary = []
    for kind in kernels:
        for rows in rows_list:
            per_layer = sum(r["us"] for r in results
                            if r["kernel"] == kind and r["rows"] == rows and r["shape"] in STEP_SHAPES)
            summary.append({"kernel": kind, "rows": rows, "step_ms": per_layer * LAYERS / 1e3})
    print("\ndecoder linears per step (40 layers), ms:")
    print("rows  " + "".join(f"{k:>12s}" for k in kernels))
    for rows in rows_list:
        line = [s["step_ms"] for s in summary if s["rows"] == rows]
        print(f"{rows:5d} " + "".join(f"{v:12.3f}" for v in line))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results,
                                         "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
