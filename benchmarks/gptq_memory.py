"""Weight and peak GPU memory of a GLM-4.6V-Flash-shaped model (random weights): bf16 vs GPTQ-4.

    python benchmarks/gptq_memory.py --mode bf16  --json out/bf16.json
    python benchmarks/gptq_memory.py --mode gptq4 --json out/gptq4.json
    python benchmarks/gptq_memory.py --check-layout      # CPU: our packing == gptqmodel's

The model is `Glm46VForConditionalGeneration` with transformers' default `Glm46VConfig` (the
GLM-4.6V-Flash sizes), random weights, on one GPU.

`--mode gptq4` turns every linear layer of the language model's decoder layers (q/k/v/o,
gate_up_proj, down_proj) into the GPTQ-4 storage that gptqmodel writes and loads
(`qweight` int32 [in/8, out], `qzeros` int32 [in/g, out/8], `scales` fp16 [in/g, out],
`g_idx` int32 [in]; symmetric, group size 128, GPTQ v1 zero offset). The 4-bit values are
round-to-nearest, not GPTQ-solved: running GPTQ on 10B random weights would take far longer and
gives the same sizes. The vision tower, embeddings, norms and lm_head stay bf16, as in the
quantized checkpoints `vlm-serve quantize` writes. The forward pass dequantizes one layer's
weight to bf16 and multiplies (what gptqmodel's TorchLinear kernel does without torch.compile),
so the peak includes one dequantized weight at a time; Marlin or Triton kernels skip that
transient and are faster, so the decode speed printed here is not a kernel benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.common

from benchmarks.common import GPTQLinear, quantize_language_model
from engine.quant.gptq_layout import GptqWeights


def build_model(device: str, tiny: bool = False):
    import transformers as t

    cfg = t.Glm46VConfig()
    if tiny:  # a smoke-test size, for checking the script on CPU
        cfg.text_config.update({"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 256,
                                    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 151552})
        cfg.vision_config.update({"hidden_size": 64, "depth": 2, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 256})
    cfg.text_config.rope_parameters = {
        "rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]
    }
    cfg.image_token_id = getattr(cfg, "image_token_id", None) or 151343
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly (no fp32 copy of 10B weights)
    try:
        with torch.device(device):
            model = t.Glm46VForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, cfg


def make_inputs(cfg, model, batch: int, device: str):
    import numpy as np
    import transformers as t
    from PIL import Image

    ip = t.Glm46VImageProcessor()
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (448, 448, 3), dtype=np.uint8))
    enc = ip(images=[img], return_tensors="pt")
    grid = enc["image_grid_thw"]
    n_img = int(grid.prod() // 4)
    ids = [[100 + i for i in range(20)] + [cfg.image_token_id] * n_img + [200 + i for i in range(20)]] * batch
    return {
        "input_ids": torch.tensor(ids, device=device),
        "attention_mask": torch.ones(batch, len(ids[0]), dtype=torch.long, device=device),
        "pixel_values": enc["pixel_values"].repeat(batch, 1).to(device, torch.bfloat16),
        "image_grid_thw": grid.repeat(batch, 1).to(device),
    }


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def measure(mode: str, batches: list[int], new_tokens: int, group_size: int, tiny: bool = False) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:  # CPU smoke test: memory figures below read 0
        for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
            setattr(torch.cuda, name, lambda *a, **k: None)
        for name in ("memory_allocated", "max_memory_allocated", "max_memory_reserved"):
            setattr(torch.cuda, name, lambda *a, **k: 0)
    t0 = time.time()
    model, cfg = build_model(device, tiny)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if cuda else "cpu"
    result: dict = {"mode": mode, "params_b": round(params / 1e9, 2), "device": name, "torch": torch.__version__}
    if mode == "gptq4":
        result["quantized_linears"] = quantize_language_model(model, group_size)
        result["group_size"] = group_size
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    result["build_s"] = round(time.time() - t0, 1)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    lm = model.model.language_model
    lm_bytes = sum(t.numel() * t.element_size() for t in list(lm.layers.parameters()) + list(lm.layers.buffers()))
    result["weight_bytes_gib"] = gib(weights)
    result["decoder_layers_gib"] = gib(lm_bytes)
    result["allocated_after_load_gib"] = gib(torch.cuda.memory_allocated())
    result["runs"] = {}
    for batch in batches:
        inputs = make_inputs(cfg, model, batch, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            t1 = time.time()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            dt = time.time() - t1
        result["runs"][batch] = {
            "prompt_tokens": inputs["input_ids"].shape[1],
            "new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
            "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
            "generate_s": round(dt, 2),
        }
        print(mode, batch, json.dumps(result["runs"][batch]), flush=True)
    return result


def weight_sizes(group_size: int) -> dict:
    """Exact bytes of every weight, bf16 vs GPTQ-4, from shapes alone (the model built on `meta`)."""
    out = {}
    for mode in ("bf16", "gptq4"):
        model, _ = build_model("meta")
        if mode == "gptq4":
            quantize_language_model(model, group_size)
        tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith("_shifts")]
        lm_layers = model.model.language_model.layers
        layer_tensors = list(lm_layers.parameters()) + [
            b for n, b in lm_layers.named_buffers() if not n.endswith("_shifts")
        ]
        out[mode] = {
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            "all_weights_gib": gib(sum(t.numel() * t.element_size() for t in tensors)),
            "decoder_layers_gib": gib(sum(t.numel() * t.element_size() for t in layer_tensors)),
            "visual_gib": gib(sum(t.numel() * t.element_size() for t in model.model.visual.parameters())),
            "embed_and_lm_head_gib": gib(
                sum(t.numel() * t.element_size() for t in (model.model.language_model.embed_tokens.weight, model.lm_head.weight))
            ),
        }
    return out


def check_layout() -> None:
    """Our buffers and dequantization equal gptqmodel's TorchLinear.pack of the same values (CPU)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=False)
    ours = GPTQLinear.from_linear(lin, 128)
    ref = TorchLinear(bits=4, group_size=128, sym=True, desc_act=False, in_features=256, out_features=96,
                      bias=False, pack_dtype=torch.int32, register_buffers=True)
    scales = ours.scales.float().t().contiguous()  # gptqmodel's pack takes [out, groups]
    zeros = torch.full_like(scales, 8.0)
    ref.pack_original(lin, scales, zeros, ours.g_idx.clone())
    assert torch.equal(ref.qweight, ours.qweight), "qweight differs"
    # gptqmodel keeps zeros in its internal v2 form (zero) and writes v1 (zero - 1) when saving.
    assert torch.equal(ref.qzeros - 0x11111111, ours.qzeros), "qzeros differs"
    assert torch.equal(ref.scales, ours.scales), "scales differ"
    err = (GptqWeights.from_module(ours).dequantized() - lin.weight).abs().max().item()
    print(f"layout matches gptqmodel's TorchLinear.pack_original; max |dequant - w| = {err:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["bf16", "gptq4"], default="bf16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument("--check-layout", action="store_true")
    parser.add_argument("--sizes", action="store_true", help="weight bytes from shapes only (no GPU; meta tensors)")
    parser.add_argument("--tiny", action="store_true", help="a small config, for a smoke test on CPU")
    args = parser.parse_args(argv)
    if args.check_layout:
        check_layout()
        return 0
    if args.sizes:
        print(json.dumps(weight_sizes(args.group_size), indent=2))
        return 0
    result = measure(args.mode, [int(b) for b in args.batches.split(",")], args.new_tokens, args.group_size, args.tiny)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
