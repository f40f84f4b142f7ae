"""Bytes held by the KV cache after a generation: the model dtype's cache vs the int8 (and int4) one.

    python benchmarks/kv_cache_memory.py                        # trained demo model, bf16, CPU
    python benchmarks/kv_cache_memory.py --new-tokens 1000 --device cuda --json out/kv.json

One request (a held-out image and question, as served) generates exactly `--new-tokens` tokens
(end-of-sequence suppressed) three times: with transformers' default cache, then with the
quantized cache the server configures for `quantization: {kv_cache: int8}` (and `int4`), through
`engine.quant.gptq.generation_kwargs`, so the figure is for what serving runs. The cache
object `generate()` returns is then measured: every tensor it holds (quantized values, scales,
zeros and the full-precision residual of the most recent tokens), counted once. No estimate: the
bytes are the tensors' own. Greedy tokens are compared too (answer quality is quality.py's table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's packages, installed or not

from engine.loader import DTYPES
from engine.quant.gptq import generation_kwargs
from serve_app.settings import QuantizationSettings


def tensors_in(obj: Any, seen: set[int]) -> int:
    """Bytes of every tensor reachable from `obj` through attributes, tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.numel() else 0
    if isinstance(obj, dict):
        return sum(tensors_in(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensors_in(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        return sum(tensors_in(v, seen) for v in vars(obj).values())
    return 0


def cache_bytes(cache: Any) -> int:
    seen: set[int] = set()
    return sum(tensors_in(layer, seen) for layer in cache.layers)


def run(model, processor, inputs: dict, new_tokens: int, kv_cache: str) -> dict[str, Any]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
        pad_token_id=processor.tokenizer.pad_token_id,
        **generation_kwargs(QuantizationSettings(kv_cache=kv_cache)),
    )  # fmt: skip
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    prompt = inputs["input_ids"].shape[1]
    cached = out.sequences.shape[1] - 1  # the last token is sampled, never fed back
    size = cache_bytes((getattr(out, 'cache', None) or out.past_key_values))
    return {
        "kv_cache": kv_cache,
        "cache_type": type((getattr(out, 'cache', None) or out.past_key_values)).__name__,
        "tokens_cached": cached,
        "prompt_tokens": prompt,
        "bytes": size,
        "bytes_per_token": size / cached,
        "tokens": out.sequences[0, prompt:].tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from demo.prompt_format import build_prompt
    from demo.vqa_data import generate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "glm4v-demo-vqa"))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=600)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device).eval()
    sample = generate("test", 1)[0]
    inputs = processor(text=[build_prompt(processor, sample.question)], images=[sample.image], return_tensors="pt")
    inputs = inputs.to(args.device)

    rows = [run(model, processor, inputs, args.new_tokens, kind) for kind in ("none", "int8", "int4")]
    reference = rows[0]
    text = model.config.get_text_config(decoder=True)
    print(f"model {args.model} ({text.num_hidden_layers} layers, {text.num_key_value_heads} KV heads, "
          f"head_dim {getattr(text, 'head_dim', None) or text.hidden_size // text.num_attention_heads}), "
          f"{args.dtype} on {args.device}; {reference['tokens_cached']} tokens cached "
          f"({reference['prompt_tokens']} prompt + {args.new_tokens - 1} generated)")
    # Past its answer the model is made to go on (end-of-sequence suppressed) into text it never saw
    # in training, where near-ties flip on any rounding: where tokens first differ says more than
    # whether all 600 agree.
    print("| KV cache | cache class | bytes | bytes / token | vs model dtype | greedy tokens equal up to |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for row in rows:
        row["ratio"] = row["bytes"] / reference["bytes"]
        pairs = list(zip(row["tokens"], reference["tokens"]))
        row["equal_tokens"] = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        print(f"| {row['kv_cache']} | {row['cache_type']} | {row['bytes']:,} | {row['bytes_per_token']:,.0f} | "
              f"{row['ratio']:.3f} | {row['equal_tokens']} of {len(pairs)} |")
    if args.json:
        for row in rows:
            row.pop("tokens")
        Path(args.json).write_text(json.dumps({"model": args.model, "dtype": args.dtype, "device": args.device,
                                               "new_tokens": args.new_tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
