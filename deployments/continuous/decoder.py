"""GLM-4V's language model as the continuous engine runs it: HF prefill, own decode step.

Prefill is the model's own forward pass (vision encoder, image-token merge, multimodal rotary
positions, every layer), so the prompt is read exactly as `generate()` reads it; its keys and
values are then copied into the request's slot.

The decode step is a re-statement of `Glm4vTextModel.forward` for one new token per slot, on the
same modules (so the same weights, quantized linears included):
  x = embed(token); per layer: x += post_self_attn_norm(attn(input_norm(x))),
                               x += post_mlp_norm(mlp(post_attention_norm(x)));
  logits = lm_head(norm(x)).
What differs is only how attention finds its keys: the new key/value is written into the slot at
`length` and attention reads the first L positions of every slot with a length mask. Rotary
positions need no per-token work: after the prompt, GLM-4V's three mrope components are all
`length + rope_delta` (see `Glm4vModel.get_rope_index`), so one scalar per slot is enough.

The step has no data-dependent shapes and no host reads, so it can be compiled and captured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb

from deployments.continuous.sampling import RowParams, sample
from deployments.continuous.slots import SlotKVCache, SlotState

SUPPORTED_MODEL_TYPES = ("glm4v", "glm46v")


def unsupported_reason(model, kv_cache_quantization: str = "none") -> str | None:
    """Why the continuous engine cannot run `model` (None: it can)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if kv_cache_quantization != "none":
        return "a quantized KV cache is only available with generate()"
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if type(language_model).__name__ != "Glm4vTextModel":
        return f"its language model is {type(language_model).__name__}, not Glm4vTextModel"
    rope = getattr(language_model.rotary_emb, "rope_type", None)
    if rope != "default":
        return f"rope_type {rope!r} (only 'default' is implemented in the decode step)"
    attention = language_model.layers[0].self_attn
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "its attention has no q/k/v/o projections"
    return None


@dataclass
class Prefill:
    """What one prefill forward pass gives the engine, row by row (rows in the order given)."""

    logits: torch.Tensor  # [rows, vocab] at each prompt's last position
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, width, head_dim], prompts right-aligned
    values: list[torch.Tensor]
    rope_deltas: list[int]


class Glm4vDecoder:
    """Prefill through the HF model; the decode step over the slot cache on its modules."""

    def __init__(self, model, cache: SlotKVCache, state: SlotState, eos_ids: set[int], device: torch.device) -> None:
        self.model = model
        language_model = model.model.language_model
        self.embed = language_model.embed_tokens
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.lm_head = model.lm_head
        rotary = language_model.rotary_emb
        self.inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float32)
        self.rope_scale = float(rotary.attention_scaling)
        attention = self.layers[0].self_attn
        self.heads, self.kv_heads = attention.num_heads, attention.num_key_value_heads
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.cache, self.state = cache, state
        vocab = self.lm_head.out_features
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.eos_mask[[i for i in sorted(eos_ids) if i < vocab]] = True
        self.row_ids = torch.arange(cache.slots, device=device)
        # As long as the cache's positions, one more than any span (see SlotKVCache).
        self.span_ids = torch.arange(cache.keys[0].shape[2], device=device)
        self._layer = self.layer  # compile_forward swaps in the compiled one

    # ---- prefill ---------------------------------------------------------------------------

    def prefill(self, inputs: dict[str, torch.Tensor], device: torch.device) -> Prefill:
        """Run left-padded prompts (engine._collate's layout, on the CPU) through the HF model."""
        position_ids, deltas = self.rope_positions(inputs)
        on_device = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in on_device:
            on_device["pixel_values"] = on_device["pixel_values"].to(self.model.dtype)
        cache = DynamicCache(config=self.model.config)
        out = self.model(**on_device, position_ids=position_ids.to(device), cache=cache, use_cache=True,
                         logits_to_keep=1)
        layers = out.cache.layers
        return Prefill(out.logits[:, -1], [layer.keys for layer in layers], [layer.values for layer in layers],
                       deltas)

    def rope_positions(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """GLM-4V's 3D positions for the prompts, and each row's delta for the tokens after them.

        Computed here (on the CPU tensors) rather than left to the model, which would keep the
        deltas in `model.model.rope_deltas`, state shared with any generate() call.
        """
        mask = inputs["attention_mask"]
        if "image_grid_thw" in inputs:
            positions, deltas = self.model.model.get_rope_index(
                inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"], attention_mask=mask,
            )
            return positions, [int(d) for d in deltas.view(-1)]
        # Text only: plain positions over the unpadded tokens, as generate() numbers them.
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return text[None].expand(3, -1, -1), [0] * mask.shape[0]

    # ---- decode ----------------------------------------------------------------------------

    def step(self, active: torch.Tensor, span: torch.Tensor, any_sampled: bool) -> None:
        """One token for slots 0..B-1 (B = len(active)) attending over cache positions 0..L-1
        (L = len(span)); updates the slot state in place and leaves the tokens in `next_token`.

        Inactive rows compute too (their slots are free or finished) but change nothing that a
        live sequence reads: their tokens, lengths and counters stay as they were.
        """
        rows, state = active.shape[0], self.state
        tokens = state.last_token[:rows]
        logits = self.forward(rows, span)
        generated = state.generated[:rows]
        params = RowParams(
            temperature=state.temperature[:rows], top_p=state.top_p[:rows], seed=state.seed[:rows],
            counter=generated, suppress_eos=state.ignore_eos[:rows] | (generated < state.min_tokens[:rows]),
        )
        chosen = sample(logits, params, self.eos_mask, any_sampled)
        state.next_token[:rows].copy_(chosen)
        state.last_token[:rows].copy_(torch.where(active, chosen, tokens))
        state.length[:rows].add_(active.long())
        state.generated[:rows].add_(active.long())

    def forward(self, rows: int, span: torch.Tensor) -> torch.Tensor:
        """The language model over slots 0..rows-1: the next-token logits [rows, vocab], each new
        token's key/value written into its slot. Its layers are what `torch.compile` gets
        (`compile_forward`): sampling stays eager, since inductor fails on its sort/scatter over the
        vocabulary (torch 2.11), and inside a CUDA graph its few kernels cost nothing to launch anyway."""
        state = self.state
        tokens, length = state.last_token[:rows], state.length[:rows]
        hidden = self.embed(tokens)[:, None, :]
        cos, sin = self.rotary(length + state.rope_delta[:rows], hidden.dtype)
        # Rows with a cache longer than the span are never live (the engine picks L above every live
        # length); clamping keeps their writes inside their own slot.
        write_at = length.clamp(max=span.shape[0] - 1)
        visible = (span[None, :] <= length[:, None])[:, None, None, :]
        for layer, cache_k, cache_v in zip(self.layers, self.cache.keys, self.cache.values):
            hidden = self._layer(layer, cache_k, cache_v, hidden, cos, sin, write_at, visible)
        return self.lm_head(self.norm(hidden))[:, 0]

    def compile_forward(self, mode: str) -> None:
        """Have `forward` run torch.compile'd decoder layers (the layer, not the whole forward: the
        40 layers are one module class, and dynamo compiles the function once for all of them, its
        weights and cache tensors being arguments, where the whole 40-layer forward took minutes to
        compile on the GLM-4.6V shape). Dynamic shapes from the start: one compilation covers every
        batch size and span, plus one for batch 1 (PyTorch specialises sizes of 1)."""
        self._layer = torch.compile(self.layer, mode=mode, fullgraph=False, dynamic=True)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [rows, 1, rotary_dim] for one position per row.

        `Glm4vTextRotaryEmbedding` takes three position components and interleaves their
        frequency sections; with all three equal that is the plain frequency vector, so this is
        the same arithmetic (float32 product, cos/sin, repeat_interleave, cast) on one component.
        """
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        cos = (freqs.cos() * self.rope_scale).repeat_interleave(2, dim=-1)
        sin = (freqs.sin() * self.rope_scale).repeat_interleave(2, dim=-1)
        return cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)

    def layer(self, layer, cache_k: torch.Tensor, cache_v: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, write_at: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Glm4vTextDecoderLayer.forward for one token per row, attention over the slot cache (the
        layer's own keys and values)."""
        residual = hidden
        attended = self.attention(layer.self_attn, cache_k, cache_v, layer.input_layernorm(hidden), cos, sin,
                                  write_at, visible)
        hidden = residual + layer.post_self_attn_layernorm(attended)
        residual = hidden
        return residual + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(hidden)))

    def attention(self, attn, cache_k: torch.Tensor, cache_v: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, write_at: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        rows, span = x.shape[0], visible.shape[-1]
        q = attn.q_proj(x).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        slots = self.row_ids[:rows]
        cache_k[slots, :, write_at] = k[:, :, 0]
        cache_v[slots, :, write_at] = v[:, :, 0]
        # Grouped-query attention without repeating the cache: the query heads that share a
        # key/value head become that head's "query positions" (query head h reads kv head
        # h // groups, as transformers' repeat_kv arranges them).
        groups = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(
            q.reshape(rows, self.kv_heads, groups, self.head_dim),
            cache_k[:rows, :, :span], cache_v[:rows, :, :span],
            attn_mask=visible, scale=self.scaling,
        )
        return attn.o_proj(out.reshape(rows, 1, self.heads * self.head_dim))
