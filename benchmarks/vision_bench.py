"""The vision encoder alone: HF's per-image SDPA against one varlen attention call per block.

    python benchmarks/vision_bench.py --random-glm46v-shape --dtype bfloat16 --batch-sizes 1,8,32

For each number of images B (`--image-size` each, made by `benchmarks.common.make_requests`), the median of
`--repeats` runs of `get_image_features`, each ended by a device synchronisation, for:
- sdpa: transformers' vision attention as loaded (SDPA image by image): the baseline;
- varlen: `engine/models/glm4v/vision.py`'s attention (one FlashAttention call per block);
- varlen+compile: the same with each block compiled (`compile_blocks`).
Exactness: each variant's features are compared with a float32 copy of the vision tower (HF's
attention): the relative error max|x - ref| / max|ref|, against the same error of the bf16 baseline
(FlashAttention needs bf16/fp16, so no variant can be compared in float32 itself). With compilation,
the encoder is first warmed up as the engine does (`vision.warm_up_images`), then the number of
graphs compiled after that is counted over every batch size and a second, unround image size
(`--other-image-size`): 0 expected, any other number is a stall in serving.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.common

from benchmarks.common import add_model_arguments, load_from_arguments, make_requests, sync
from engine.continuous.runner import compiled_graphs
from engine.models.glm4v import vision


@torch.inference_mode()
def encode(loaded, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return torch.cat(loaded.model.model.get_image_features(pixels, grid).pooler_output)


def timed(loaded, pixels, grid, repeats: int) -> tuple[float, torch.Tensor]:
    features = encode(loaded, pixels, grid)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sync(loaded.device)
        start = time.perf_counter()
        encode(loaded, pixels, grid)
        sync(loaded.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--image-size", default="448x448")
    parser.add_argument("--other-image-size", default="300x500")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    loaded = load_from_arguments(args)
    sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    width, height = (int(v) for v in args.image_size.split("x"))

    def images(b: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        collated = loaded.collate(make_requests(loaded, b, size, "Describe.", 1, args.seed))
        return collated["pixel_values"], collated["image_grid_thw"]

    inputs = {b: images(b, (width, height)) for b in sizes}
    other_size = tuple(int(v) for v in args.other_image_size.split("x"))
    other = {b: images(b, other_size) for b in sizes}
    results: dict[str, dict[int, float]] = {}
    reference: dict[int, torch.Tensor] = {}
    with torch.inference_mode():  # float32 references, before any variant changes the tower
        visual32 = copy.deepcopy(loaded.model.model.visual).float()
        for b, (pixels, grid) in inputs.items():
            reference[b] = visual32(pixels.float(), grid_thw=grid).pooler_output
        del visual32
    gaps: dict[str, float] = {}
    graphs = None
    for variant in ("sdpa", "varlen", "varlen+compile"):
        if variant == "varlen" and not vision.use_varlen_attention(loaded.model, loaded.device):
            print(f"varlen attention unavailable: {vision.unsupported_reason(loaded.model, loaded.device)}")
            break
        if variant == "varlen+compile":
            vision.compile_blocks(loaded.model, "default")
            with torch.inference_mode():
                encode(loaded, *vision.warm_up_images(loaded.model, loaded.device))
            before = compiled_graphs()
        results[variant] = {}
        gap = 0.0
        for b in sizes:
            seconds, features = timed(loaded, *inputs[b], args.repeats)
            results[variant][b] = seconds
            error = (features.float() - reference[b]).abs().max() / reference[b].abs().max()
            gap = max(gap, error.item())
        gaps[variant] = gap
        if variant == "varlen+compile":
            with torch.inference_mode():
                for b in sizes:
                    encode(loaded, *other[b])
            graphs = compiled_graphs() - before
    gpu = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else str(loaded.device)
    print(f"vision encoder of {loaded.settings.id} ({loaded.model.dtype}) on {gpu} | image {args.image_size} | "
          f"median of {args.repeats}")
    print(f"{'B':>4}" + "".join(f"{v:>16}" for v in results) + f"{'ratio':>9}")
    for b in sizes:
        row = [results[v][b] for v in results]
        print(f"{b:>4}" + "".join(f"{t * 1e3:>13.1f} ms" for t in row) + f"{row[0] / row[-1]:>8.2f}x")
    for variant, gap in gaps.items():
        print(f"{variant}: relative error against float32 {gap:.3g}")
    if graphs is not None:
        print(f"graphs compiled after the warm-up, over batch sizes {sizes} x images {args.image_size} and "
              f"{args.other_image_size}: {graphs}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "seconds": results, "relative_error_vs_float32": gaps,
                                               "compiled_graphs": graphs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
