"""GLM-4.6V-Flash's shape without its weights: config, processor and tokenizer.

    python benchmarks/glm46v_shape.py checkpoints/glm-4.6v-flash-shape [--tiny]

writes a checkpoint directory with no weights, which `configs/models/glm-4.6v-flash-dummy.yaml`
serves with `load_format: dummy` (random weights made on the GPU at load), so the whole Ray
application can be benchmarked at the production model's size on a machine that cannot download
it. The shape is `benchmarks.common.glm46v_shape`'s: transformers' default `Glm46VConfig` (10.3B
parameters), the demo model's tokenizer and GLM-4.6V's default image processor. `--tiny` shrinks it
to a CPU's size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.common

from benchmarks.common import glm46v_shape


def save_shape(out: Path, tiny: bool = False) -> None:
    config, processor, generation = glm46v_shape(tiny)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    generation.save_pretrained(out)
    processor.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the directory to write")
    parser.add_argument("--tiny", action="store_true", help="the same architecture at a CPU's size (0.08B parameters)")
    args = parser.parse_args(argv)
    save_shape(args.out, args.tiny)
    print(f"wrote {args.out} (config, processor, tokenizer; no weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
