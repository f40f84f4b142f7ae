"""Where the continuous engine's prefill spends its time, phase by phase (no Ray, no HTTP).

    python benchmarks/prefill_profile.py --random-glm46v-shape --batch-sizes 1,8,32 --json $OUT/prefill.json
    python benchmarks/prefill_profile.py --random-glm46v-shape --tiny --batch-sizes 1,2      # anywhere

For each batch size B (B requests, one `--image-size` image each, `benchmarks.common.make_requests`)
the phases of one admission are timed separately, each ended by a device synchronisation, median
of `--repeats`:
- collate: left-padding the prompts on the CPU (engine/collate.py);
- rope: GLM-4V's 3D positions and deltas (`Glm4vDecoder.rope_positions`, on the CPU);
- vision: the vision encoder alone over the B images (`get_image_features`);
- prefill: the engine's prefill (`Glm4vDecoder.embed_prompts`, the vision encoder included, then
  `Glm4vDecoder.prefill`, its own layer loop writing keys and values straight into cache blocks;
  the scratch block here), the total's part on the device;
- hf: the baseline, measured in the same run: the HF model's own forward pass into a `DynamicCache`.
`first` is the level's first admission, untimed in the others: what a shape never seen before
costs (kernel selection, cuDNN attention plans; compilation with `--compile`).
`--compile` compiles the engine's layers as `compile: true` does; `--compile-vision` also each block
of the vision encoder (`nn.Module.compile`, dynamic shapes: PyTorch's regional compilation; the
engine does not, since every new number of images in a pass recompiles them, up to dynamo's limit). With
`--profile-batch B` the prefill at B also runs under torch.profiler, and the operators taking the
most device time are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.common

from benchmarks.common import add_model_arguments, load_from_arguments, make_requests, sync
from engine.continuous.runner import ModelRunner
from serve_app.settings import ContinuousEngineSettings


def timed(device: torch.device, fn) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def hf_forward(runner: ModelRunner, inputs: dict[str, torch.Tensor]) -> None:
    """The baseline: the HF model's forward pass into a DynamicCache."""
    device, model = runner.device, runner.loaded.model
    position_ids, _ = runner.decoder.rope_positions(inputs)
    on_device = {k: v.to(device) for k, v in inputs.items()}
    on_device["pixel_values"] = on_device["pixel_values"].to(model.dtype)
    model(**on_device, position_ids=position_ids.to(device), cache=DynamicCache(config=model.config), use_cache=True,
          logits_to_keep=1)


def engine_prefill(runner: ModelRunner, inputs: dict[str, torch.Tensor]) -> None:
    """The engine's prefill of the whole prompts, into the scratch block."""
    prompts = runner.decoder.embed_prompts(inputs, runner.device)
    rows, width = inputs["input_ids"].shape
    last = torch.tensor(prompts.lengths, device=runner.device) - 1
    runner.decoder.prefill(prompts, runner.scratch_chunk(rows, width), last)


@torch.inference_mode()
def phases(runner: ModelRunner, batch) -> dict[str, float]:
    device, decoder, model = runner.device, runner.decoder, runner.loaded.model
    collate_s, inputs = timed(device, lambda: runner.loaded.collate(batch, torch.device("cpu")))
    rope_s, _ = timed(device, lambda: decoder.rope_positions(inputs))
    pixels = inputs["pixel_values"].to(device, model.dtype)
    grid = inputs["image_grid_thw"].to(device)
    vision_s, _ = timed(device, lambda: model.model.get_image_features(pixels, grid))
    prefill_s, _ = timed(device, lambda: engine_prefill(runner, inputs))
    hf_s, _ = timed(device, lambda: hf_forward(runner, inputs))
    return {"collate_s": collate_s, "rope_s": rope_s, "vision_s": vision_s, "prefill_s": prefill_s, "hf_s": hf_s}


@torch.inference_mode()
def profile(runner: ModelRunner, batch, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = runner.loaded.collate(batch, torch.device("cpu"))
    on_cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch_profile(activities=activities) as prof:
        engine_prefill(runner, inputs)
        sync(runner.device)
    key = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--image-size", default="448x448")
    parser.add_argument("--prompt", default="Describe this image in detail.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-batch", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-vision", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    loaded = load_from_arguments(args)
    sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    options = ContinuousEngineSettings(max_slots=max(sizes), cuda_graphs=False)
    # The runner alone: its prefill is timed here, phase by phase, without the engine's thread.
    runner = ModelRunner(loaded.with_settings(continuous=options))
    if args.compile:
        runner.decoder.compile_forward("default")
    if args.compile_vision:
        for block in loaded.model.model.visual.blocks:
            block.compile(dynamic=True)
    width, height = (int(v) for v in args.image_size.split("x"))
    gpu = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else str(loaded.device)
    print(f"{loaded.settings.id} ({loaded.model.dtype}) on {gpu} | image {args.image_size} | median of {args.repeats}")
    print(f"{'B':>4}{'tokens':>8}{'collate':>9}{'rope':>9}{'vision':>9}{'prefill':>9}{'ms/row':>9}{'hf':>9}"
          f"{'ratio':>7}{'first':>9}")
    levels = []
    for b in sizes:
        batch = make_requests(loaded, b, (width, height), args.prompt, 8, args.seed)
        first = phases(runner, batch)  # also the warm-up: cuBLAS handles, kernel selection
        runs = [phases(runner, batch) for _ in range(args.repeats)]
        level = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        level.update(batch=b, prompt_tokens=batch[0].prompt_tokens, first_s=first["prefill_s"],
                     hf_over_prefill=level["hf_s"] / level["prefill_s"])
        levels.append(level)
        ms = {k: level[k] * 1e3 for k in runs[0]}
        print(f"{b:>4}{b * batch[0].prompt_tokens:>8}{ms['collate_s']:>9.1f}{ms['rope_s']:>9.1f}"
              f"{ms['vision_s']:>9.1f}{ms['prefill_s']:>9.1f}{ms['prefill_s'] / b:>9.1f}{ms['hf_s']:>9.1f}"
              f"{level['hf_over_prefill']:>7.2f}{first['prefill_s'] * 1e3:>9.1f}", flush=True)
    # One more request of a prompt length not seen yet: a new shape at B=1, cold then warm.
    fresh = make_requests(loaded, 1, (width, height), args.prompt + " Be brief.", 8, args.seed + 1)
    cold, warm = phases(runner, fresh), phases(runner, fresh)
    print(f"B=1, a new prompt length ({fresh[0].prompt_tokens} tokens): first {cold['prefill_s'] * 1e3:.1f} ms, "
          f"then {warm['prefill_s'] * 1e3:.1f} ms", flush=True)
    levels.append({"batch": 1, "prompt_tokens": fresh[0].prompt_tokens, "new_shape_first_s": cold["prefill_s"],
                   "new_shape_then_s": warm["prefill_s"]})
    if args.profile_batch:
        batch = make_requests(loaded, args.profile_batch, (width, height), args.prompt, 8, args.seed)
        print(f"\nprefill at B={args.profile_batch}, operators by device time:")
        print(profile(runner, batch))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": loaded.settings.id, "device": gpu, "levels": levels}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
