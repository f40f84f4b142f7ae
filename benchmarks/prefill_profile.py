"""Where the continuous engine's prefill spends its time, phase by phase (no Ray, no HTTP).

    python benchmarks/prefill_profile.py --random-glm46v-shape --batch-sizes 1,8,32 --json $OUT/prefill.json
    python benchmarks/prefill_profile.py --random-glm46v-shape --tiny --batch-sizes 1,2      # anywhere

For each batch size B (B requests, one `--image-size` image each, as engine_bench.py makes them)
the phases of one admission are timed separately, each ended by a device synchronisation, median
of `--repeats`:
- collate: left-padding the prompts on the CPU (`Engine._collate`);
- rope: GLM-4V's 3D positions and deltas (`Glm4vDecoder.rope_positions`, on the CPU);
- vision: the vision encoder alone over the B images (`get_image_features`);
- forward: the whole HF forward pass as the engine runs it (vision encoder included);
- load: copying the prompts' keys and values into their slots (`SlotKVCache.load_prompt`).
`first` is the level's first admission, untimed in the others: what a shape never seen before
costs (kernel selection, cuDNN attention plans; compilation with `--compile-layers`).
`--compile-layers` compiles each decoder layer of the language model and each block of the vision
encoder (`nn.Module.compile`, dynamic shapes), PyTorch's regional compilation: identical layers
share one compiled graph. With `--profile-batch B` the forward pass at B also runs under torch.profiler, and the operators
taking the most device time are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_bench import _sync, load_engine, make_requests  # noqa: E402
from deployments.continuous import ContinuousEngine  # noqa: E402
from serve_app.settings import ContinuousEngineSettings  # noqa: E402


def timed(device: torch.device, fn) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


@torch.inference_mode()
def phases(cengine: ContinuousEngine, batch) -> dict[str, float]:
    device, decoder = cengine.device, cengine.decoder
    collate_s, inputs = timed(device, lambda: cengine._collate(batch, torch.device("cpu")))
    rope_s, _ = timed(device, lambda: decoder.rope_positions(inputs))
    pixels = inputs["pixel_values"].to(device, cengine.model.dtype)
    grid = inputs["image_grid_thw"].to(device)
    vision_s, _ = timed(device, lambda: cengine.model.model.get_image_features(pixels, grid))
    forward_s, prefill = timed(device, lambda: decoder.prefill(inputs, device))

    def load() -> None:
        for j, request in enumerate(batch):
            n = request.prompt_tokens
            cengine.cache.load_prompt(j, [k[j, :, -n:] for k in prefill.keys], [v[j, :, -n:] for v in prefill.values])

    load_s, _ = timed(device, load)
    return {"collate_s": collate_s, "rope_s": rope_s, "vision_s": vision_s, "forward_s": forward_s,
            "load_s": load_s, "total_s": collate_s + forward_s + load_s}


@torch.inference_mode()
def profile(cengine: ContinuousEngine, batch, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = cengine._collate(batch, torch.device("cpu"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cengine.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        cengine.decoder.prefill(inputs, cengine.device)
        if cengine.device.type == "cuda":
            torch.cuda.synchronize(cengine.device)
    key = "self_cuda_time_total" if cengine.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="configs/models/demo.yaml")
    parser.add_argument("--random-glm46v-shape", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--image-size", default="448x448")
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-batch", type=int, default=None)
    parser.add_argument("--compile-layers", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    engine = load_engine(args)
    sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    options = ContinuousEngineSettings(max_slots=max(sizes), cuda_graphs=False)
    cengine = ContinuousEngine(engine.settings.model_copy(update={"continuous": options}), engine.model,
                               engine.processor, engine.device)
    if args.compile_layers:
        inner = engine.model.model
        for block in [*inner.language_model.layers, *inner.visual.blocks]:
            block.compile(dynamic=True)
    width, height = (int(v) for v in args.image_size.split("x"))
    gpu = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else str(engine.device)
    print(f"{engine.settings.id} ({engine.model.dtype}) on {gpu} | image {args.image_size} | median of {args.repeats}")
    print(f"{'B':>4}{'tokens':>8}{'collate':>9}{'rope':>9}{'vision':>9}{'forward':>9}{'load':>9}{'total':>9}"
          f"{'ms/row':>9}{'first':>9}")
    levels = []
    try:
        for b in sizes:
            batch = make_requests(engine, b, (width, height), args.prompt, 8, args.seed)
            first = phases(cengine, batch)  # also the warm-up: cuBLAS handles, kernel selection
            runs = [phases(cengine, batch) for _ in range(args.repeats)]
            level = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            level.update(batch=b, prompt_tokens=batch[0].prompt_tokens, first_s=first["total_s"])
            levels.append(level)
            ms = {k: level[k] * 1e3 for k in runs[0]}
            print(f"{b:>4}{b * batch[0].prompt_tokens:>8}{ms['collate_s']:>9.1f}{ms['rope_s']:>9.1f}"
                  f"{ms['vision_s']:>9.1f}{ms['forward_s']:>9.1f}{ms['load_s']:>9.1f}{ms['total_s']:>9.1f}"
                  f"{ms['total_s'] / b:>9.1f}{first['total_s'] * 1e3:>9.1f}", flush=True)
        # One more request of a prompt length not seen yet: a new shape at B=1, cold then warm.
        fresh = make_requests(engine, 1, (width, height), args.prompt + " Be brief.", 8, args.seed + 1)
        cold, warm = phases(cengine, fresh), phases(cengine, fresh)
        print(f"B=1, a new prompt length ({fresh[0].prompt_tokens} tokens): first {cold['total_s'] * 1e3:.1f} ms, "
              f"then {warm['total_s'] * 1e3:.1f} ms", flush=True)
        levels.append({"batch": 1, "prompt_tokens": fresh[0].prompt_tokens, "new_shape_first_s": cold["total_s"],
                       "new_shape_then_s": warm["total_s"]})
        if args.profile_batch:
            batch = make_requests(engine, args.profile_batch, (width, height), args.prompt, 8, args.seed)
            print(f"\nforward pass at B={args.profile_batch}, operators by device time:")
            print(profile(cengine, batch))
    finally:
        cengine.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": engine.settings.id, "device": gpu, "levels": levels}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
