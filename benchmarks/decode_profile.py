"""Where one decode step's time goes, against what reading the weights allows (no Ray, no HTTP).

    python benchmarks/decode_profile.py --random-glm46v-shape --dtype bfloat16 --rows 1,32 --json $OUT/decode.json
    python benchmarks/decode_profile.py --random-glm46v-shape --tiny --rows 1,4 --attention gather   # anywhere

For each batch size B, B slots are filled with sequences of `--length` cached tokens (blocks of the
paged cache, keys and values zero: the step's cost does not depend on them), and the engine's own
decode step (compiled with `--compile`, captured in a CUDA graph on a GPU) is replayed `--steps`
times per decode-attention kind (`--attention`, engine/attention): the median step time, in the same
call for every kind. Then, on a GPU:
- the weights' floor: the bytes of the decoder's linear weights and `lm_head` over the bandwidth of
  a device-to-device copy measured here (`copy_tb_s`);
- each linear shape alone (`x @ W.T` at B rows, CUDA events): time and achieved bandwidth, summed
  over the layers (`linears`), and `lm_head`;
- a torch.profiler trace of graph replays, its kernels grouped: GEMM/GEMV, attention, sampling
  (the ops after `lm_head`), the rest (inductor's fused norms/rotary/residuals, copies); `gaps` is
  the step time the kernels do not cover.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.common

from benchmarks.common import add_model_arguments, load_from_arguments, sync
from engine.continuous.blocks import blocks_for
from engine.continuous.runner import ModelRunner
from serve_app.settings import ContinuousEngineSettings


def fill_slots(runner: ModelRunner, rows: int, length: int) -> None:
    """Slots 0..rows-1 live, each with `length` tokens cached in blocks of its own."""
    state, block_size = runner.state, runner.cache.block_size
    per_row = blocks_for(length + 64, block_size)
    assert rows * per_row < runner.cache.num_blocks, "raise --kv-cache-blocks"
    table = torch.zeros_like(state.block_table[:rows])
    table[:, :per_row] = 1 + torch.arange(rows * per_row, device=table.device).view(rows, per_row)
    state.block_table[:rows] = table
    state.length[:rows] = length
    state.active[:rows] = True
    state.temperature[:rows] = 0.0


def step_times(runner: ModelRunner, rows: int, span: int, steps: int) -> list[float]:
    """Seconds per decode step at (rows, span), greedy, each replay timed alone. The lengths are put
    back after each step, so every step reads the same cache."""
    key = (rows, span, False, False)
    saved = runner.state.length[:rows].clone()
    times = []
    for _ in range(steps + 3):
        sync(runner.device)
        started = time.perf_counter()
        runner.steps.run(key)
        sync(runner.device)
        times.append(time.perf_counter() - started)
        runner.state.length[:rows].copy_(saved)
    return times[3:]


def copy_bandwidth(device: torch.device, gigabytes: float = 2.0) -> float:
    """TB/s of a device-to-device copy (read + write counted), best of 5."""
    a = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        started = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * a.numel() / best / 1e12


def linear_shapes(model) -> list[tuple[str, torch.Tensor, int]]:
    """(name, weight, how many layers have it) for each decoder linear, and lm_head."""
    layer = model.model.language_model.layers[0]
    count = len(model.model.language_model.layers)
    fused = hasattr(layer.self_attn, "qkv_proj")  # then q, k and v are views of it (not read again)
    named = [(name, module.weight) for name, module in layer.named_modules()
             if isinstance(module, torch.nn.Linear)
             and not (fused and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"))]
    return [(name, weight, count) for name, weight in named] + [("lm_head", model.lm_head.weight, 1)]


def time_linear(weight: torch.Tensor, rows: int, repeats: int = 50) -> float:
    """Median seconds of x @ W.T for x [rows, in] (CUDA events)."""
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    times = []
    for _ in range(repeats + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.nn.functional.linear(x, weight)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[5:])


KERNEL_GROUPS = (
    ("attention", ("_split_kernel", "_combine_kernel", "attention", "fmha", "flash", "sdpa")),
    ("gemm", ("gemm", "gemv", "xmma", "cutlass", "sm90", "matmul", "splitk", "cublas")),
    ("sampling", ("argmax", "scatter", "gather", "sort", "cumsum", "softmax", "reduce")),
)


def kernel_split(runner: ModelRunner, key: tuple[int, int, bool, bool], steps: int = 20) -> dict[str, float]:
    """Device milliseconds per step by kernel group, over `steps` replays under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    rows = key[0]
    saved = runner.state.length[:rows].clone()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.steps.run(key)
            runner.state.length[:rows].copy_(saved)
        sync(runner.device)
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if not micros:
            continue
        name = event.key.lower()
        group = next((g for g, marks in KERNEL_GROUPS if any(m in name for m in marks)), "other")
        groups[group] = groups.get(group, 0.0) + micros / 1e3 / steps
    return groups


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--length", type=int, default=400, help="tokens cached per row (448x448 image prompt + output)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--attention", default="gather,triton", help="decode-attention kinds to time")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--kv-cache-blocks", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    loaded = load_from_arguments(args)
    device = loaded.device
    sizes = [int(v) for v in args.rows.split(",")]
    span = max(256, 1 << args.length.bit_length())
    results: dict = {"rows": sizes, "length": args.length, "span": span, "steps": {}, "kernels": {}}
    for kind in args.attention.split(","):
        options = ContinuousEngineSettings(max_slots=max(sizes), batch_buckets=sizes, cuda_graphs=device.type == "cuda",
                                           compile=args.compile, decode_attention=kind,
                                           kv_cache_blocks=args.kv_cache_blocks)
        runner = ModelRunner(loaded.with_settings(continuous=options, max_model_len=max(span * 2, 2048)))
        for rows in sizes:
            fill_slots(runner, rows, args.length)
            median = statistics.median(step_times(runner, rows, span, args.steps))
            results["steps"][f"{kind}@{rows}"] = median
            print(f"{kind:>7} attention, {rows:>3} rows: decode step {median * 1e3:.2f} ms", flush=True)
            if device.type == "cuda":
                split = kernel_split(runner, (rows, span, False, False))
                results["kernels"][f"{kind}@{rows}"] = split
                covered = sum(split.values())
                print("         kernels (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(split.items()))
                      + f"; gaps {median * 1e3 - covered:.2f}", flush=True)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        copy = copy_bandwidth(device)
        shapes = linear_shapes(loaded.model)
        weight_bytes = sum(w.numel() * w.element_size() * n for _, w, n in shapes)
        results.update(copy_tb_s=copy, weight_bytes=weight_bytes, floor_ms=weight_bytes / (copy * 1e12) * 1e3)
        print(f"weights read per step {weight_bytes / 1e9:.2f} GB; copy {copy:.2f} TB/s -> floor "
              f"{results['floor_ms']:.2f} ms", flush=True)
        for rows in sizes:
            linears = {}
            for name, weight, count in shapes:
                seconds = time_linear(weight, rows)
                linears[name] = {"ms_total": seconds * count * 1e3,
                                 "tb_s": weight.numel() * weight.element_size() / seconds / 1e12,
                                 "shape": list(weight.shape)}
            results[f"linears@{rows}"] = linears
            total = sum(v["ms_total"] for v in linears.values())
            print(f"{rows:>3} rows: linears alone {total:.2f} ms per step: " + ", ".join(
                f"{k} {v['ms_total']:.2f} ms ({v['tb_s']:.2f} TB/s)" for k, v in linears.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
