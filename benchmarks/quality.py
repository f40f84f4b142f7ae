"""Quality of quantized variants against the float model, on a fixed held-out set.

    python benchmarks/quality.py                      # demo model; makes the GPTQ variants if missing
    python benchmarks/quality.py --float checkpoints/glm4v-demo-vqa \\
        --variant gptq8=checkpoints/glm4v-demo-gptq8 --variant gptq4=checkpoints/glm4v-demo-gptq4 --n 200
    python benchmarks/quality.py --continuous-kv --n 100   # the continuous engine's int8 KV cache

Held-out set: the first `--n` samples of the synthetic VQA `test` split (demo/vqa_data.py),
which neither training nor GPTQ calibration (its own seed stream) draws from.

Per variant, against the float model:
- top-1 agreement: teacher-forced over the prompt's last position and every reference-answer token,
  the share of positions whose argmax token equals the float model's;
- logit cosine: mean cosine similarity of the logits at those positions;
- generated agreement: greedy generation (`--max-new-tokens`), the share of the float model's
  generated tokens that the variant reproduces at the same position;
- answer accuracy: exact-match accuracy of the greedy answer (normalized as in vqa_data); only
  meaningful for the trained demo model (the random one answers nothing right).
Variant `kv-int8` is the float model with transformers' quantized KV cache (HQQ, 8 bits): the
prefill is unchanged by construction, so only the generated columns tell about it.

`--continuous-kv` measures instead the continuous engine's own int8 KV cache (`quantization:
{kv_cache: int8}`: int8 codes, a scale per position and head, in its paged cache) against the same
engine over the model-dtype cache: the held-out requests prepared as the server prepares them, all
submitted at once, greedy; per cache its KV bytes per token, the generated-token agreement with the
model-dtype cache's tokens, and the answer accuracy. (Teacher-forced columns would not tell: a prompt
prefilled in one pass attends over its fresh keys and values, quantized only for later steps.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAINED = ROOT / "checkpoints" / "glm4v-demo-vqa"


@dataclass
class Row:
    name: str
    agreement: float
    cosine: float
    generated_agreement: float
    accuracy: float
    seconds: float


def load(path: str | Path, kv_cache: str = "none"):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from engine.quant.gptq import load_kwargs

    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=torch.float32, **load_kwargs(path, torch.device("cpu"))
    ).eval()
    return model, AutoProcessor.from_pretrained(str(path))


def held_out(n: int):
    from demo.vqa_data import generate

    return generate("test", n)


def prompt(processor: Any, question: str) -> str:
    try:
        from demo.prompt_format import build_prompt

        return build_prompt(processor, question)
    except ImportError:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def teacher_forced_logits(model, processor, samples) -> list[torch.Tensor]:
    """Per sample, logits at the prompt's last position and at each reference-answer token."""
    out = []
    with torch.inference_mode():
        for s in samples:
            text = prompt(processor, s.question)
            batch = processor(text=[text + s.answer], images=[s.image], return_tensors="pt")
            n_prompt = processor(text=[text], images=[s.image], return_tensors="pt")["input_ids"].shape[1]
            logits = model(**batch).logits[0].float()
            out.append(logits[n_prompt - 1 : -1])
    return out


def greedy(model, processor, samples, max_new_tokens: int, generation: dict, batch_size: int = 16):
    from transformers import GenerationConfig

    tokens, texts = [], []
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = processor(
                text=[prompt(processor, s.question) for s in chunk], images=[s.image for s in chunk],
                return_tensors="pt", padding=True,
            )  # fmt: skip
            config = GenerationConfig(
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                eos_token_id=model.generation_config.eos_token_id, **generation,
            )  # fmt: skip
            new = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :]
            tokens += [row.tolist() for row in new]
            texts += processor.batch_decode(new, skip_special_tokens=True)
    return tokens, texts


def compare(name, model, processor, samples, reference, max_new_tokens, generation=None) -> Row:
    from demo.vqa_data import is_correct

    started = time.monotonic()
    logits = teacher_forced_logits(model, processor, samples)
    tokens, texts = greedy(model, processor, samples, max_new_tokens, generation or {})
    ref_logits, ref_tokens = reference
    agree = total = 0
    cosines = []
    for a, b in zip(ref_logits, logits):
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item())
    same = count = 0
    for want, got in zip(ref_tokens, tokens):
        same += sum(int(x == y) for x, y in zip(want, got))
        count += len(want)
    accuracy = sum(is_correct(t, s.answer) for t, s in zip(texts, samples)) / len(samples)
    return Row(name, agree / total, sum(cosines) / len(cosines), same / max(count, 1), accuracy,
               time.monotonic() - started)  # fmt: skip


@dataclass
class CacheRow:
    kv_cache: str
    bytes_per_token: int
    generated_agreement: float
    accuracy: float
    seconds: float


def continuous_kv(source: Path, samples, max_new_tokens: int, device: str) -> list[CacheRow]:
    """The continuous engine over `source` (float32 on the CPU) with kv_cache none, then int8 (see the
    module docstring); 16 rows decode at once."""
    from benchmarks.engine_bench import run_engine
    from demo.vqa_data import is_correct
    from engine.continuous.engine import ContinuousEngine
    from engine.loader import load_model
    from engine.prompts import Prompter
    from serve_app.settings import ContinuousEngineSettings, ModelSettings, QuantizationSettings
    from serve_app.stage_types import GenerationRequest, ImagePart, PromptMessage, SamplingParams, TextPart

    loaded = load_model(ModelSettings(id=source.name, path=str(source), device=device,
                                      dtype="float32" if device == "cpu" else "auto", max_model_len=1024,
                                      engine="continuous", continuous=ContinuousEngineSettings(max_slots=16)))
    prompter = Prompter(loaded.settings, loaded.processor)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    requests = [prompter.prepare(GenerationRequest([PromptMessage("user", (ImagePart(), TextPart(s.question)))],
                                                   [preprocessed(loaded, s.image)], params)) for s in samples]
    rows, reference = [], None
    for kv_cache in ("none", "int8"):
        engine = ContinuousEngine(loaded.with_settings(quantization=QuantizationSettings(kv_cache=kv_cache)))
        try:
            cache = engine.runner.cache
            per_token = cache.bytes() // (cache.num_blocks * cache.block_size)
            started = time.monotonic()
            run = run_engine(engine, requests)
        finally:
            engine.close()
        reference = reference or run.tokens
        same = sum(a == b for want, got in zip(reference, run.tokens) for a, b in zip(want, got))
        accuracy = sum(is_correct(t, s.answer) for t, s in zip(run.texts, samples)) / len(samples)
        rows.append(CacheRow(kv_cache, per_token, same / max(1, sum(map(len, reference))), accuracy,
                             time.monotonic() - started))
    return rows


def preprocessed(loaded, image):
    """`image` (PIL) through the model's image processor, as the image preprocessor sends it."""
    from serve_app.stage_types import PreprocessedImage

    processor = loaded.processor.image_processor
    features = processor(images=[image], return_tensors="pt")
    t, h, w = (int(v) for v in features["image_grid_thw"][0])
    merge = getattr(processor, "merge_size", 1) ** 2
    return PreprocessedImage(features["pixel_values"].to(loaded.model.dtype), (t, h, w), *image.size,
                             tokens=t * h * w // merge)


def cache_table(rows: list[CacheRow], n: int, source: str) -> str:
    lines = [
        (f"held-out: {n} samples of the vqa_data test split; the continuous engine over {source}, greedy; "
         "reference: its model-dtype KV cache"),
        "",
        "| kv_cache | KV bytes per token | generated-token agreement | answer accuracy | seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r.kv_cache} | {r.bytes_per_token} | {r.generated_agreement:.1%} | {r.accuracy:.1%} "
                     f"| {r.seconds:.1f} |")
    return "\n".join(lines)


def make_variant(source: Path, bits: int, out: Path, calibration: int) -> Path:
    backend = {8: "torch_int8", 4: "torch_fused"}[bits]
    command = [sys.executable, "-m", "serve_app.cli.quantize", "--model", str(source), "--bits", str(bits),
               "--group-size", "32", "--calibration", str(calibration), "--backend", backend, "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return out


def table(rows: list[Row], n: int, source: str) -> str:
    lines = [
        f"held-out: {n} samples of the vqa_data test split; reference: float32 model at {source}",
        "",
        "| variant | top-1 agreement | logit cosine | generated-token agreement | answer accuracy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.agreement:.1%} | {r.cosine:.4f} | {r.generated_agreement:.1%} | {r.accuracy:.1%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float", dest="float_path", default=None, help="float checkpoint (default: trained demo, "
                        "else a freshly made random demo model)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--calibration", type=int, default=32, help="for variants this script makes")
    parser.add_argument("--no-kv", action="store_true", help="skip the int8 KV-cache variant")
    parser.add_argument("--continuous-kv", action="store_true",
                        help="instead: the continuous engine with kv_cache int8 against kv_cache none")
    parser.add_argument("--device", default="cpu", help="with --continuous-kv: where the engine runs")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="quality-"))
    if args.float_path:
        source = Path(args.float_path)
    elif (TRAINED / "config.json").exists():
        source = TRAINED
    else:
        from demo.model import make_demo_model

        source = Path(make_demo_model(work / "glm4v-demo"))
    if args.continuous_kv:
        print(cache_table(continuous_kv(source, held_out(args.n), args.max_new_tokens, args.device), args.n,
                          str(source)))
        return 0
    variants = dict(v.split("=", 1) for v in args.variant)
    if not args.variant:
        for bits in (8, 4):
            variants[f"gptq{bits}"] = str(make_variant(source, bits, work / f"gptq{bits}", args.calibration))

    samples = held_out(args.n)
    model, processor = load(source)
    reference = (teacher_forced_logits(model, processor, samples),
                 greedy(model, processor, samples, args.max_new_tokens, {})[0])  # fmt: skip
    rows = [compare("float32 (reference)", model, processor, samples, reference, args.max_new_tokens)]
    if not args.no_kv:
        from engine.quant.gptq import QuantizationSettings, generation_kwargs

        kv = generation_kwargs(QuantizationSettings(kv_cache="int8", kv_cache_residual_length=0))
        rows.append(compare("float32 + kv-int8", model, processor, samples, reference, args.max_new_tokens, kv))
    del model
    for name, path in variants.items():
        model, processor = load(path)
        rows.append(compare(name, model, processor, samples, reference, args.max_new_tokens))
        del model
    print(table(rows, args.n, str(source)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
