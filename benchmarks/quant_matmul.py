"""Quantized matmul kernels on GLM-4.6V-Flash's decoder shapes, against bf16 cuBLAS (CUDA only).

    python benchmarks/quant_matmul.py --json $OUT/quant_matmul.json
    python benchmarks/quant_matmul.py --rows 1,32 --kernels bf16,gemlite4     # a subset
    python benchmarks/quant_matmul.py --sweep --rows 1,16,32,64,128,512 --json $OUT/sweep.json

For each linear shape of a decoder layer (fused q/k/v, o, fused gate/up, down; k alone, to see
what fusing saves) and each row count, every kernel runs `x @ W.T` captured `--calls` times in one
CUDA graph, replayed `--replays` times: the median time per call, the weight bytes it read per
second, and its error against the dequantized weights. Kernels:
- `bf16`: F.linear on bf16 weights (cuBLAS), the baseline of the same call;
- `tinygemm4`: PyTorch's int4 matmul (engine/quant/int4_linear.py; dequantize + cuBLAS over 16 rows);
- `gemlite4`, `gemlite8`: gemlite's kernels (engine/quant/gemlite_linear.py), GPTQ group size 128;
- `splitk4`, `splitk8`: our split-K Triton kernel (engine/quant/splitk_linear.py) as the server
  launches it (its tuned table, else its rule of thumb).
`--sweep` instead times the split-K kernel over a grid of launch parameters for every shape, bit
width and row count (compiled first by a pool of processes), and prints the best of each as the
`TUNED` table of engine/quant/splitk_linear.py, beside bf16 cuBLAS in the same call.
`step_ms`: the four shapes x 40 layers, the decoder's linear time per step at that row count.
"""

from __future__ import annotations

import argparse
import json
import os
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
    if kind.startswith("splitk"):
        from engine.quant.splitk_linear import SplitKLinear

        return SplitKLinear.from_weights(weights, torch.bfloat16, torch.device("cuda")), reference, nbytes
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


def sweep_candidates(rows: int):
    """Launch parameters to try at `rows` (split_k left at 1: `sweep` varies it). block_m 1 is the
    GEMV kernel (engine/quant/splitk_linear.py's KernelConfig)."""
    from engine.quant.splitk_linear import KernelConfig

    def gemv(block_ms):
        return [KernelConfig(m, n, k, 1, w, st) for m in block_ms for n in (128, 256, 512) for k in (64, 128)
                for w in (4, 8) for st in (1, 2, 3)]

    if rows <= 4:
        return gemv([m for m in (1, 2, 4) if m <= rows and 2 * m > rows or m == rows // 2])
    if rows <= 16:
        return gemv([4])[::3] + [KernelConfig(16, n, k, 1, 4, st) for n in (128, 256) for k in (64, 128) for st in (2, 3)]
    if rows <= 64:
        block_ms = sorted({max(16, 1 << (rows - 1).bit_length()), 64})
        return [KernelConfig(m, n, k, 1, w, st) for m in block_ms for n in (64, 128, 256) for k in (64, 128)
                for w in (4, 8) for st in (3, 4)]
    return [KernelConfig(m, n, 128, 1, w, 3) for m in (64, 128) for n in (64, 128) for w in (4, 8)]


SPLITS = (1, 2, 4, 8, 16, 32)


def _compile_share(share: list[tuple[int, int, dict]]) -> int:
    """Compile (in a pool worker) each (bits, atomic, config) of `share` into Triton's on-disk cache."""
    import torch

    from engine.quant.splitk_linear import KernelConfig, splitk_matmul

    done = 0
    for bits, split, fields in share:
        config = KernelConfig(**{**fields, "split_k": split})
        k, n = 1024, 256
        x = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16)
        qweight = torch.zeros(k * bits // 32, n, device="cuda", dtype=torch.int32)
        scales = torch.zeros(k // GROUP, n, device="cuda", dtype=torch.bfloat16)
        zeros = torch.zeros(k // GROUP, n, device="cuda", dtype=torch.uint8)
        try:
            splitk_matmul(x, qweight, scales, zeros, None, bits, GROUP, config)
            done += 1
        except Exception as error:  # a config Triton cannot build (too much shared memory): skipped later too
            print(f"compile {bits}-bit {config}: {type(error).__name__}: {str(error)[:120]}", flush=True)
    return done


def precompile(rows_list: list[int], bits_list: list[int], workers: int) -> None:
    """Every sweep kernel built once by a pool of processes (Triton's compile is mostly single-threaded)."""
    import concurrent.futures
    import dataclasses
    import multiprocessing

    jobs = {(bits, split, tuple(sorted(dataclasses.asdict(c).items())))
            for rows in rows_list for c in sweep_candidates(rows) for bits in bits_list for split in (1, 2)}
    jobs = [(bits, split, dict(fields)) for bits, split, fields in sorted(jobs)]
    shares = [jobs[i::workers] for i in range(workers)]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        built = sum(pool.map(_compile_share, shares))
    print(f"sweep: {built} of {len(jobs)} kernels built by {workers} processes", flush=True)


def sweep(rows_list: list[int], bits_list: list[int], calls: int, replays: int, workers: int) -> dict:
    """The split-K kernel's best launch per (bits, rows, shape), beside bf16 cuBLAS."""
    from engine.quant.splitk_linear import SplitKLinear, rows_bucket, splitk_matmul

    precompile(rows_list, bits_list, workers)
    best: list[dict] = []
    for name in STEP_SHAPES:
        in_features, out_features = SHAPES[name]
        bf16, _, bf16_bytes = make_kernel("bf16", in_features, out_features, seed=0)
        for bits in bits_list:
            weights = random_weights(in_features, out_features, bits, seed=1)
            layer = SplitKLinear.from_weights(weights, torch.bfloat16, torch.device("cuda"))
            reference = weights.dequantized().cuda()
            nbytes = weights.codes.numel() * bits // 8 + weights.scales.numel() * 3
            for rows in rows_list:
                x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
                want = x.float() @ reference.t()
                baseline = time_call(bf16, x, calls, replays)
                try:
                    default = time_call(layer, x, calls, replays)
                except Exception as error:  # the rule of thumb's launch does not build here
                    print(f"  default launch fails: {type(error).__name__}: {str(error)[:100]}", flush=True)
                    default = float("nan")
                results = []
                for config in sweep_candidates(rows):
                    tiles = in_features // config.block_k
                    for split in SPLITS:
                        if split > max(1, tiles // 2) or (rows > 64 and split > 2):
                            continue
                        chosen = dataclasses_replace(config, split_k=split)

                        def fn(inp, chosen=chosen, layer=layer, bits=bits):
                            return splitk_matmul(inp, layer.qweight, layer.scales, layer.zeros, None, bits, GROUP,
                                                 chosen)
                        try:
                            seconds = time_call(fn, x, calls, replays)
                        except Exception as error:
                            print(f"  skip {chosen}: {type(error).__name__}", flush=True)
                            continue
                        results.append((seconds, chosen))
                results.sort(key=lambda r: r[0])
                seconds, chosen = results[0]
                with torch.no_grad():
                    got = splitk_matmul(x, layer.qweight, layer.scales, layer.zeros, None, bits, GROUP, chosen).float()
                error = ((got - want).abs().max() / want.abs().max()).item()
                row = {"shape": name, "in": in_features, "out": out_features, "bits": bits, "rows": rows,
                       "bucket": rows_bucket(rows), "us": seconds * 1e6, "tb_s": nbytes / seconds / 1e12,
                       "default_us": default * 1e6, "bf16_us": baseline * 1e6,
                       "bf16_tb_s": bf16_bytes / baseline / 1e12, "rel_error": error,
                       "config": chosen.__dict__, "runner_up": [(s * 1e6, c.__dict__) for s, c in results[1:4]]}
                best.append(row)
                print(f"{name:8s} {bits}-bit rows {rows:4d}: best {seconds * 1e6:7.1f} us {nbytes / seconds / 1e12:5.2f} "
                      f"TB/s (default {default * 1e6:7.1f}, bf16 {baseline * 1e6:7.1f} us "
                      f"{bf16_bytes / baseline / 1e12:4.2f} TB/s) err {error:.4f} {chosen}", flush=True)
            del layer
        del bf16
        torch.cuda.empty_cache()
    print("\nTUNED = {")
    for row in best:
        c = row["config"]
        print(f"    ({row['bits']}, {row['bucket']}, {row['in']}, {row['out']}): KernelConfig({c['block_m']}, "
              f"{c['block_n']}, {c['block_k']}, {c['split_k']}, {c['num_warps']}, {c['num_stages']}),"
              f"  # rows {row['rows']}: {row['us']:.1f} us")
    print("}")
    print("\ndecoder linears per step (40 layers), ms: rows, bf16, 4-bit best, 4-bit default, 8-bit best, 8-bit default")
    for rows in rows_list:
        def total(bits, key, rows=rows):
            return sum(r[key] for r in best if r["rows"] == rows and r["bits"] == bits) * LAYERS / 1e3
        bf16_ms = sum(r["bf16_us"] for r in best if r["rows"] == rows and r["bits"] == 4) * LAYERS / 1e3
        print(f"{rows:5d} {bf16_ms:8.3f} {total(4, 'us'):8.3f} {total(4, 'default_us'):8.3f} "
              f"{total(8, 'us'):8.3f} {total(8, 'default_us'):8.3f}")
    return {"device": torch.cuda.get_device_name(), "sweep": best}


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,512,2048")
    parser.add_argument("--kernels", default="bf16,tinygemm4,splitk4,splitk8,gemlite4,gemlite8")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sweep", action="store_true", help="tune the split-K kernel's launches (see above)")
    parser.add_argument("--write-tuned", type=Path, help="with --sweep: write the best launches there (the "
                        "server reads engine/quant/splitk_tuned.json)")
    parser.add_argument("--bits", default="4,8", help="with --sweep: the bit widths to tune")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.sweep:
        found = sweep(rows_list, [int(b) for b in args.bits.split(",")], args.calls, args.replays, args.workers)
        if args.write_tuned:  # merged into what the file holds: a sweep of some row counts keeps the others
            configs = [{k: r[k] for k in ("bits", "bucket", "in", "out", "config", "rows", "us")} for r in found["sweep"]]
            fresh = {(c["bits"], c["bucket"], c["in"], c["out"]) for c in configs}
            if args.write_tuned.is_file():
                configs += [c for c in json.loads(args.write_tuned.read_text())["configs"]
                            if (c["bits"], c["bucket"], c["in"], c["out"]) not in fresh]
            configs.sort(key=lambda c: (c["bits"], c["in"], c["out"], c["bucket"] or 1 << 30))
            args.write_tuned.write_text(json.dumps({"device": found["device"], "configs": configs}, indent=1) + "\n")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(found, indent=1))
        return
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
