"""What the benchmark scripts share: picking and loading a model, making requests, device syncs,
and the stand-ins for weights the scripts' machines do not have (GLM-4.6V-Flash's shape with
random weights, GPTQ-4 storage). A library for the scripts here; none of them imports another.

Each script puts the repository root on `sys.path` before importing this module as
`benchmarks.common`, so that it runs as `python benchmarks/X.py` from a checkout, installed or not.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from engine.loader import DTYPES, LoadedModel, load_model, resolve_dtype
from engine.prompts import PreparedRequest, Prompter
from engine.quant.gptq_layout import pack_rows
from serve_app.settings import ModelSettings, resolve_path
from serve_app.stage_types import (
    GenerationRequest,
    ImagePart,
    PreprocessedImage,
    PromptMessage,
    SamplingParams,
    TextPart,
)

ROOT = Path(__file__).resolve().parent.parent


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU): timings end after it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- picking and loading the model ----------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick the model, for `load_from_arguments`."""
    parser.add_argument("--model", default="configs/models/demo.yaml", help="a model YAML, checkpoint dir or hub id")
    parser.add_argument("--random-glm46v-shape", action="store_true",
                        help="a GLM-4.6V-Flash-shaped model with random weights instead of --model")
    parser.add_argument("--tiny", action="store_true", help="with --random-glm46v-shape: a small size for CPUs")
    parser.add_argument("--weights", choices=["float", *GPTQ_WEIGHTS], default="float",
                        help="with --random-glm46v-shape: gptq4/gptq8 serve the decoder linears as a GPTQ checkpoint "
                             "of 4/8 bits (group size 128) is served on this device")
    parser.add_argument("--gptq-backend", default="auto", choices=["auto", "tinygemm", "splitk", "gemlite"],
                        help="with --weights gptq*: our kernel to repack for (auto: the server's choice on CUDA, splitk; "
                             "tinygemm on the CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the model config's / auto)")
    parser.add_argument("--dtype", default=None, choices=["auto", *DTYPES])
    parser.add_argument("--seed", type=int, default=0)


def load_from_arguments(args: argparse.Namespace) -> LoadedModel:
    """The model `add_model_arguments`' options pick, loaded as the server loads it."""
    if args.random_glm46v_shape:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return random_glm46v_model(device, resolve_dtype(args.dtype, device), tiny=args.tiny, seed=args.seed,
                                   weights=args.weights, gptq_backend=args.gptq_backend)
    return load_model(settings_for(args.model, args.device, args.dtype))


def settings_for(model: str, device: str | None, dtype: str | None) -> ModelSettings:
    """A model YAML (configs/models/*.yaml) or a checkpoint directory / hub id, with overrides."""
    if model.endswith((".yaml", ".yml")) and resolve_path(model).is_file():
        settings = ModelSettings.from_yaml(model)
    else:
        settings = ModelSettings(id=Path(model).name or model, path=model)
    update = {k: v for k, v in (("device", device), ("dtype", dtype)) if v}
    return settings.model_copy(update=update) if update else settings


def random_glm46v_model(device: torch.device, dtype: torch.dtype, tiny: bool = False, seed: int = 0,
                        weights: str = "float", gptq_backend: str = "auto") -> LoadedModel:
    """GLM-4.6V-Flash's shape (`glm46v_shape`) with random weights, made on `device`; with
    `weights="gptq4"` or "gptq8" its decoder linears are then quantized and served as a GPTQ
    checkpoint is, on `gptq_backend` (the server's setting; auto: its choice for the device)."""
    import transformers as t

    config, processor, generation = glm46v_shape(tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        model = t.Glm46VForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config = generation
    name = "glm-4.6v-flash-random" + (f"-{weights}" if weights != "float" else "") + ("-tiny" if tiny else "")
    if weights in GPTQ_WEIGHTS:
        bits = GPTQ_WEIGHTS[weights]
        # Our own kernels (gptqmodel's need its modules, which these layers are not): on CUDA the server's
        # choice (engine/quant/gptq.py); on the CPU, tinygemm's CPU twin, the one of ours that runs there.
        if gptq_backend == "auto":
            from engine.quant.gptq import gptq_backend as server_choice

            gptq_backend = server_choice(bits, device) if device.type == "cuda" else "tinygemm"
        gptq_weights(model, bits, gptq_backend)
    settings = ModelSettings(id=name, path="(random weights)", device=str(device),
                             dtype={v: k for k, v in DTYPES.items()}[dtype], max_model_len=16384)
    return LoadedModel(settings, model, processor, device)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (the int4 layers' fused
    q/k/v codes are views shared with the separate projections)."""
    storages = {}
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ---- requests ----------------------------------------------------------------------------------


def make_image(loaded: LoadedModel, size: tuple[int, int], seed: int) -> PreprocessedImage:
    """Random coloured blocks of `size`, through the model's image processor as the preprocessor does
    (which sends the pixels in the model's dtype where its YAML names one, as the GPU configs do)."""
    from PIL import Image

    rng = random.Random(seed)
    blocks = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(256) for _ in range(8 * 8 * 3)))
    image = blocks.resize(size, Image.Resampling.NEAREST)
    image_processor = loaded.processor.image_processor
    features = image_processor(images=[image], return_tensors="pt")
    t_, h, w = (int(v) for v in features["image_grid_thw"][0])
    merge = getattr(image_processor, "merge_size", 1) ** 2
    pixels = features["pixel_values"].to(loaded.model.dtype)
    return PreprocessedImage(pixels, (t_, h, w), *size, tokens=t_ * h * w // merge)


def make_requests(loaded: LoadedModel, count: int, image_size: tuple[int, int] | None, prompt: str,
                  new_tokens: int, seed: int) -> list[PreparedRequest]:
    """`count` greedy requests of exactly `new_tokens` tokens (end-of-sequence ignored), each with its own
    image of `image_size` (None: text only) and `prompt`, prepared as the server prepares them."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompter = Prompter(loaded.settings, loaded.processor)
    prepared = []
    for i in range(count):
        images = [make_image(loaded, image_size, seed * 100_003 + i)] if image_size else []
        parts = (ImagePart(), TextPart(prompt)) if images else (TextPart(prompt),)
        prepared.append(prompter.prepare(GenerationRequest([PromptMessage("user", parts)], images, params)))
    return prepared


def with_tokens(batch: list[PreparedRequest], n: int) -> list[PreparedRequest]:
    """Copies of `batch` that generate `n` tokens each."""
    return [replace(r, max_tokens=n, sampling=replace(r.sampling, max_tokens=n)) for r in batch]


def parse_size(value: str) -> tuple[int, int] | None:
    """'WxH' as (W, H); 'none' (or 0, or nothing) as None."""
    if value.lower() in ("none", "0", ""):
        return None
    w, h = (int(v) for v in value.lower().split("x"))
    return w, h


# ---- GLM-4.6V-Flash's shape without its weights ---------------------------------------------------


def glm46v_shape(tiny: bool = False):
    """(config, processor, generation_config) of the GLM-4.6V-Flash shape: transformers' default
    `Glm46VConfig` (10.3B parameters: 40 layers, hidden 4096, 32 query / 2 key-value heads, vocabulary
    151,552), the demo model's tokenizer (same special tokens and chat template) and GLM-4.6V's default
    image processor (448x448 -> 256 image tokens). `tiny`: the same architecture at a CPU's size."""
    import transformers as t

    from demo.model import CHAT_TEMPLATE, EOS_TOKENS, build_tokenizer

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = t.Glm46VConfig()
    _fill_vocabulary(tokenizer, config.text_config.vocab_size)
    if tiny:
        config.text_config.update({"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 256,
                                   "num_attention_heads": 2, "num_key_value_heads": 1})
        config.vision_config.update({"hidden_size": 64, "depth": 2, "intermediate_size": 128, "num_heads": 4,
                                     "out_hidden_size": 256})
    config.text_config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default",
                                          "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]}
    # Special tokens as the demo tokenizer numbers them (the vocabulary stays 151,552 wide).
    config.image_token_id, config.video_token_id = ids("<|image|>"), ids("<|video|>")
    config.image_start_token_id, config.image_end_token_id = ids("<|begin_of_image|>"), ids("<|end_of_image|>")
    config.video_start_token_id, config.video_end_token_id = ids("<|begin_of_video|>"), ids("<|end_of_video|>")
    config.text_config.pad_token_id = ids("<|endoftext|>")
    generation = t.GenerationConfig(
        eos_token_id=[ids(name) for name in EOS_TOKENS], pad_token_id=ids("<|endoftext|>"), do_sample=False
    )
    processor = t.Glm46VProcessor(
        image_processor=t.Glm46VImageProcessor(), tokenizer=tokenizer,
        video_processor=t.Glm46VVideoProcessor(), chat_template=CHAT_TEMPLATE,
    )
    return config, processor, generation


def _fill_vocabulary(tokenizer, size: int) -> None:
    """Give every id the model can emit a text, so random weights stream visible tokens.

    The demo tokenizer knows ~1,000 tokens and GLM's vocabulary is 151,552 wide: most tokens a
    random model picks would decode to nothing, and a client would never see its first token. The
    filler entries (" t1021", " t1022", ...) have no merges, so prompts encode exactly as before.
    """
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    used = set(vocab.values()) | {token["id"] for token in state["added_tokens"]}
    for token_id in range(size):
        if token_id not in used:
            vocab[f"\u0120t{token_id}"] = token_id  # U+0120 is byte-level BPE's space
    # PreTrainedTokenizerFast keeps its tokenizers.Tokenizer here; swapping it keeps every other setting.
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))


# ---- GPTQ storage, as gptqmodel writes and loads it ---------------------------------------------------


class GPTQLinear(nn.Module):
    """A linear layer stored as gptqmodel's GPTQ (v1) buffers of `bits` bits (engine/quant/gptq_layout.py)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bits: int, bias: torch.Tensor | None,
                 device) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.bits = in_features, out_features, group_size, bits
        per, groups = 32 // bits, math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.empty(in_features // per, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features // per, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // group_size)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, bits: int = 4) -> GPTQLinear:
        """Round-to-nearest, symmetric (zero point 2**(bits-1), gptqmodel's sym range 2*max/(2**bits-1)):
        the same sizes and layout as GPTQ-solved values."""
        w = linear.weight  # [out, in]
        out_f, in_f = w.shape
        q = cls(in_f, out_f, group_size, bits, linear.bias, w.device)
        groups, top, zero = in_f // group_size, 2 ** bits - 1, 2 ** (bits - 1)
        wg = w.float().reshape(out_f, groups, group_size)
        scale = (wg.abs().amax(-1) * 2 / top).clamp_min(1e-6).half().float()  # [out, groups], fp16 as stored
        ints = torch.clamp(torch.round(wg / scale[..., None]) + zero, 0, top).to(torch.int32)
        q.qweight.copy_(pack_rows(ints.reshape(out_f, in_f).t().contiguous(), bits))
        q.scales.copy_(scale.t().to(torch.float16))
        zeros = torch.full((out_f, groups), zero - 1, dtype=torch.int32, device=w.device)  # v1 stores zero - 1
        q.qzeros.copy_(pack_rows(zeros, bits).t().contiguous())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from engine.quant.gptq_layout import GptqWeights

        out = x.to(torch.bfloat16) @ GptqWeights.from_module(self).dequantized(torch.bfloat16).t()
        return out + self.bias if self.bias is not None else out


def quantize_language_model(model: nn.Module, group_size: int = 128, bits: int = 4) -> int:
    layers = model.model.language_model.layers
    count = 0
    for layer in layers:
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(layer, parent_name)
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, GPTQLinear.from_linear(child, group_size, bits))
                    del child
                    count += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return count


GPTQ_WEIGHTS = {"gptq4": 4, "gptq8": 8}


def gptq_weights(model: torch.nn.Module, bits: int, backend: str, group_size: int = 128) -> None:
    """The random model as a GPTQ checkpoint of `bits` bits (g128, symmetric) is served on this device:
    its decoder linears rounded to gptqmodel's layout (`GPTQLinear`), then repacked for `backend` by
    the server's own code (engine/quant/gptq.py `repack`). Checks, on this device, a repacked layer
    against the dequantized GPTQ weights, at a decode step's rows and at a prompt's."""
    from engine.quant.gptq import repack
    from engine.quant.gptq_layout import GptqWeights

    device = next(model.parameters()).device
    quantized = quantize_language_model(model, group_size, bits)
    probe = model.model.language_model.layers[0].self_attn.o_proj
    weight = GptqWeights.from_module(probe).dequantized().to(device)
    checkpoint = weight_bytes(model)
    repacked = repack(model, backend, device)
    print(f"GPTQ-{bits}: {quantized} decoder linears quantized, {repacked} repacked for {backend}; weights "
          f"{weight_bytes(model) / 2**30:.2f} GiB in memory, {checkpoint / 2**30:.2f} GiB as the checkpoint holds "
          f"them ({weight_bytes(model) / checkpoint:.3f}x)", flush=True)
    layer = model.model.language_model.layers[0].self_attn.o_proj
    activations = torch.bfloat16 if device.type == "cuda" else model.dtype
    for shape in ((3, 1, layer.in_features), (1, 40, layer.in_features)):  # decode step rows; a prompt
        x = torch.randn(*shape, device=device, dtype=activations)
        reference = x.float() @ weight.t()
        error = ((layer(x).float() - reference).abs().max() / reference.abs().max()).item()
        print(f"GPTQ-{bits} on {backend}, {shape[0]}x{shape[1]} rows: relative error {error:.4f} against the "
              f"dequantized weights", flush=True)
        if error > 0.05:
            raise SystemExit(f"the repacked layer does not match the GPTQ weights ({backend})")
