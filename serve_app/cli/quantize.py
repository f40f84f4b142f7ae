"""`vlm-serve quantize`: GPTQ-quantize the language model of a transformers VLM with gptqmodel.

    vlm-serve quantize --model checkpoints/glm4v-demo-vqa --bits 8 --group-size 32 \\
        --out checkpoints/glm4v-demo-gptq8 --calibration 32

- Only the decoder layers of the language model are quantized (attention q/k/v/o and the MLP's
  fused `gate_up_proj` and `down_proj`). The vision tower (`model.visual`), the embeddings and
  `lm_head` keep their floating-point dtype (the source's dtype unless `--dtype` says otherwise).
- Calibration samples are image + question + answer conversations drawn with Pillow (the seeded
  synthetic VQA set of `demo.vqa_data` when it is importable, a small built-in drawer
  otherwise), encoded by the model's own processor and chat template, so the vision tower runs and
  the layers see image tokens as they will when serving.
- The output is a `save_pretrained` directory with `quantization_config` in config.json (what
  `AutoModelForImageTextToText.from_pretrained` needs, with gptqmodel and optimum installed) plus
  the processor's files, so the server loads it exactly like a float checkpoint.

The quantizer is gptqmodel (AutoGPTQ's maintained successor; transformers 5 and optimum 2 accept
only it). Its stock `glm4v` definition splits the MLP's fused `gate_up_proj` into `gate_proj` and
`up_proj` (through its `defuser` helper), which writes a checkpoint that transformers' Glm4v
classes cannot load; `register_glm4v_definitions()` registers a definition that keeps the fused
projection (GPTQ quantizes each output row independently with the Hessian of the shared input,
so quantizing the fused matrix is the same as quantizing its halves) for `glm4v` and `glm46v`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The model types whose language model is GLM-4 shaped (GLM-4.1V, GLM-4.5V dense, GLM-4.6V(-Flash)).
GLM4V_MODEL_TYPES: tuple[str, ...] = ("glm4v", "glm46v")
LANGUAGE_LAYERS = "model.language_model.layers"
# Per decoder layer, in execution order; the groups are quantized one after another (true sequential).
LAYER_MODULES: list[list[str]] = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_up_proj"],
    ["mlp.down_proj"],
]
# Calibration draws from the synthetic VQA generator with seeds far from its split seeds (1e6..3e6).
CALIBRATION_SEED_BASE = 9_000_000_000
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CalibrationSample:
    image: Any  # PIL.Image.Image
    question: str
    answer: str


# ----------------------------------------------------------------------------------------------
# gptqmodel model definition


def register_glm4v_definitions() -> None:
    """Register gptqmodel definitions for `glm4v` / `glm46v` that keep `gate_up_proj` fused."""
    from gptqmodel.models import auto
    from gptqmodel.models.base import BaseQModel
    from transformers import AutoModelForImageTextToText

    if getattr(auto.MODEL_MAP.get("glm4v"), "_vlm_serve", False):
        return

    class Glm4vFusedGPTQ(BaseQModel):
        """GLM-4.xV: quantize `model.language_model.layers.*`, leave `model.visual` in float."""

        _vlm_serve = True
        loader = AutoModelForImageTextToText
        require_load_processor = True
        pre_lm_head_norm_module = "model.language_model.norm"
        rotary_embedding = "model.language_model.rotary_emb"
        module_tree = [  # noqa: RUF012 - gptqmodel reads this class attribute
            "model",
            "language_model",
            "layers",
            "#",
            {
                "input_layernorm": ("input_layernorm:!",),
                "self_attn": ("q_proj:0", "k_proj:0", "v_proj:0", "o_proj:1"),
                "post_self_attn_layernorm": ("post_self_attn_layernorm:!",),
                "post_attention_layernorm": ("post_attention_layernorm:!",),
                "mlp": ("gate_up_proj:0", "down_proj:1"),
                "post_mlp_layernorm": ("post_mlp_layernorm:!",),
            },
        ]

    for model_type in GLM4V_MODEL_TYPES:
        auto.MODEL_MAP[model_type] = Glm4vFusedGPTQ
        if model_type not in auto.SUPPORTED_MODELS:
            auto.SUPPORTED_MODELS.append(model_type)


@contextlib.contextmanager
def _keep_fused_modules() -> Iterator[None]:
    """Stop gptqmodel's loader from splitting fused modules (its `defuser` step) while it runs."""
    from gptqmodel.models import loader

    original = loader.defuser

    class _NoDefuser:
        @staticmethod
        def replace_fused_blocks(*args: Any, **kwargs: Any) -> bool:
            return False

        @staticmethod
        def convert_model(*args: Any, **kwargs: Any) -> bool:
            return False

        def __getattr__(self, name: str) -> Any:
            return getattr(original, name)

    loader.defuser = _NoDefuser()
    try:
        yield
    finally:
        loader.defuser = original


# ----------------------------------------------------------------------------------------------
# Calibration data


def calibration_samples(n: int, seed: int = 0) -> list[CalibrationSample]:
    """`n` seeded image+question+answer samples, drawn with Pillow (no downloads)."""
    try:
        from demo.vqa_data import make_sample
    except ImportError:  # the synthetic VQA module is optional: fall back to a tiny drawer
        return [_drawn_sample(random.Random(f"calib:{seed}:{i}")) for i in range(n)]
    # A stream of its own, disjoint from the train/validation/test splits' seeds.
    stream = CALIBRATION_SEED_BASE + seed
    return [CalibrationSample(s.image, s.question, s.answer) for s in (make_sample(stream, i) for i in range(n))]


def _drawn_sample(rng: random.Random) -> CalibrationSample:
    from PIL import Image, ImageDraw

    colors = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 0)}
    size = rng.choice([(112, 112), (140, 112), (112, 168)])
    image = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    shape, color = rng.choice(["circle", "square"]), rng.choice(sorted(colors))
    r = min(size) // 4
    cx, cy = rng.randint(r, size[0] - r), rng.randint(r, size[1] - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colors[color])
    question = rng.choice(["What shape is this?", "What color is the shape?"])
    answer = f"It is a {shape}." if "shape is" in question else f"The {shape} is {color}."
    return CalibrationSample(image, question, answer)


def encode_calibration(processor: Any, samples: Sequence[CalibrationSample]) -> list[dict[str, Any]]:
    """One processor batch per sample: the chat template with the image, question and answer."""
    encoded = []
    for s in samples:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": s.answer}]},
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        batch = processor(text=[text], images=[s.image], return_tensors="pt")
        encoded.append(dict(batch))
    return encoded


# ----------------------------------------------------------------------------------------------
# Quantizing


def _source_dtype(model: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    dtype = getattr(config, "dtype", None) or getattr(getattr(config, "text_config", None), "dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "bfloat16"
    return name if name in _DTYPES else "bfloat16"


def quantize(
    model: str,
    out: str | Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    calibration: int = 64,
    calibration_seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    desc_act: bool = False,
    damp_percent: float = 0.05,
    pack_extension: bool = False,
    backend: str | None = None,
) -> Path:
    """GPTQ-quantize `model` (a local directory or hub id) into the directory `out`."""
    import torch

    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    out = Path(out)
    # The CPU packer is a C++ extension built on first use (minutes on a small machine); the
    # pure-torch packer is quick for small models. Workers: gptqmodel's CPU thread pool.
    if not pack_extension:
        os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 8)))

    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoProcessor

    register_glm4v_definitions()
    if dtype == "auto":
        dtype = _source_dtype(model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoProcessor.from_pretrained(model)
    samples = encode_calibration(processor, calibration_samples(calibration, calibration_seed))

    qconfig = QuantizeConfig(
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=True,
        damp_percent=damp_percent,
        device=device,
    )
    torch.manual_seed(calibration_seed)
    started = time.monotonic()
    with _keep_fused_modules():
        qmodel = GPTQModel.load(model, qconfig, dtype=getattr(torch, dtype))
        qmodel.quantize(samples, batch_size=1)
        # Write beside the target and rename, so a crash never leaves a half-written checkpoint.
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            qmodel.save(str(scratch))
            processor.save_pretrained(str(scratch))
            _finish_checkpoint(scratch, dtype, backend)
            scratch.chmod(0o755)  # mkdtemp makes it private
            if out.exists():
                shutil.rmtree(out)
            scratch.rename(out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    logger.info("quantized %s to %d bits in %.1fs -> %s", model, bits, time.monotonic() - started, out)
    return out


def _finish_checkpoint(directory: Path, dtype: str, backend: str | None = None) -> None:
    """Make the checkpoint self-describing and reproducible (no temp paths, no timings)."""
    (directory / "quant_log.csv").unlink(missing_ok=True)
    for name in ("config.json", "quantize_config.json"):
        path = directory / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        qc = data.get("quantization_config", data) if name == "config.json" else data
        meta = qc.get("meta") or {}
        meta.pop("offload_to_disk_path", None)
        # optimum reads these on load: only the language model's decoder layers are GPTQ modules.
        qc["block_name_to_quantize"] = LANGUAGE_LAYERS
        qc["modules_in_block_to_quantize"] = LAYER_MODULES
        if backend:
            from engine.quant.gptq import GPTQ_BACKENDS

            qc["backend"] = GPTQ_BACKENDS[backend]
        if name == "config.json":
            data["dtype"] = dtype
            data["use_cache"] = True
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="local checkpoint directory or hub id")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--group-size", type=int, default=128, help="columns sharing one scale (-1: per row)")
    parser.add_argument("--out", required=True, help="directory to write the quantized checkpoint to")
    parser.add_argument("--calibration", type=int, default=64, metavar="N_SAMPLES", help="image+text samples")
    parser.add_argument("--calibration-seed", type=int, default=0)
    parser.add_argument("--dtype", choices=_DTYPES, default="auto", help="dtype of the unquantized parts")
    parser.add_argument("--device", default="auto", help="where GPTQ runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--desc-act", action="store_true", help="act-order (slower kernels, a bit more accurate)")
    parser.add_argument("--damp-percent", type=float, default=0.05)
    parser.add_argument(
        "--pack-extension",
        action="store_true",
        help="pack with gptqmodel's C++ CPU packer (built on first use; worth it for large models)",
    )
    parser.add_argument(
        "--backend",
        choices=["torch", "torch_int8", "torch_fused", "marlin", "triton", "exllama_v2"],
        default=None,
        help="gptqmodel kernel written into config.json for loaders that name none (the server's "
        "engine.quant.gptq.load_kwargs overrides it per device); e.g. torch_int8 / torch_fused "
        "for CPU checkpoints, so a plain from_pretrained does not build gptqmodel's CPU extension",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    out = quantize(
        args.model,
        args.out,
        bits=args.bits,
        group_size=args.group_size,
        calibration=args.calibration,
        calibration_seed=args.calibration_seed,
        dtype=args.dtype,
        device=args.device,
        desc_act=args.desc_act,
        damp_percent=args.damp_percent,
        pack_extension=args.pack_extension,
        backend=args.backend,
    )
    print(f"quantized checkpoint written to {out}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `quantize` to `vlm-serve`'s subcommands (`parser.add_subparsers()`)."""
    parser = subparsers.add_parser(
        "quantize", help="GPTQ-quantize a VLM's language model (gptqmodel)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm-serve quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    args = add_arguments(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
