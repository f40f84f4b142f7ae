"""GLM-4V's language model as the continuous engine runs it, on the HF model's own modules.

Both passes re-state `Glm4vTextModel.forward` on the same modules (so the same weights, quantized
linears included):
  x = embed(tokens); per layer: x += post_self_attn_norm(attn(input_norm(x))),
                                x += post_mlp_norm(mlp(post_attention_norm(x)));
  logits = lm_head(norm(x)).
What differs from HF's forward is only where attention finds its keys and values: in the paged
cache (engine/continuous/slots.py), written in place, never in a `DynamicCache` copied afterwards,
in the cache's format (engine/attention/kv_format.py: the model's dtype, or int8 codes quantized as
they are written and dequantized where they are read).

Prefill: the HF vision encoder (once per image) and HF's own image-token merge and multimodal
rotary positions (`embed_prompts`), then the layers over chunks of the prompts (`prefill`), laid
out *right*-padded so that row j's column t is its position start + t. Every layer writes its
keys/values for all rows with one scatter into their blocks (pad columns into the scratch block).
A first chunk needs only plain causal attention over its own tokens (a real token at t sees only
positions <= t, all real; a pad token sees real tokens and earlier pads, so it stays finite and is
never read). A later chunk of a prompt (chunked prefill) attends over the row's earlier positions
too, gathered from its blocks.

Decode: one new token per slot, written at position `length` of its blocks; attention reads the
first L positions of every slot through its block table, with a length mask. Rotary positions need
no per-token work: after the prompt, GLM-4V's three mrope components are all `length + rope_delta`
(see `Glm4vModel.get_rope_index`), so one scalar per slot is enough. The step has no
data-dependent shapes and no host reads, so it can be compiled and captured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb

from engine.attention.continued_prompt import continued_prompt_attention
from engine.attention.kv_format import KV_FORMATS, LayerCache
from engine.attention.paged_decode import PagedDecodeAttention
from engine.continuous.sampling import RowParams, choose, process
from engine.continuous.slots import PagedKVCache, SlotState
from engine.logprobs import MAX_TOP, step_logprobs
from engine.models.glm4v import vision
from engine.quant import int4_linear

SUPPORTED_MODEL_TYPES = ("glm4v", "glm46v")


def unsupported_reason(model, kv_cache_quantization: str = "none") -> str | None:
    """Why the continuous engine cannot run `model` (None: it can)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if kv_cache_quantization not in KV_FORMATS:
        return (f"a {kv_cache_quantization} quantized KV cache is only available with generate() (transformers' "
                f"QuantizedCache); the paged cache takes kv_cache {' or '.join(map(repr, KV_FORMATS))}")
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


# Not cuDNN's attention, which PyTorch picks first for prompts on an H100: it builds a plan for each new
# (rows, width) shape, and served prompt passes rarely repeat a shape. FlashAttention has no per-shape
# setup. (A continued prompt's attention: engine/attention/continued_prompt.py.)
PROMPT_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the CPU) on `device`, without waiting for the device: CUDA makes a copy from
    pageable memory wait for every kernel queued before it, so each `.to(device)` in a prefill pass
    held the host until the device had caught up; one from pinned memory does not."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def fuse_linears(modules: list[nn.Module]) -> nn.Linear | None:
    """One float `nn.Linear` giving the outputs of `modules` side by side, or None unless all are
    plain `nn.Linear`s over the same input. The weights are held once: each module's weight (and bias)
    becomes a view of the fused one, so HF's own forward still runs through them."""
    if not modules or not all(type(m) is nn.Linear for m in modules):
        return None
    first = modules[0]
    if any((m.in_features, m.weight.dtype, m.bias is None) != (first.in_features, first.weight.dtype, first.bias is None)
           for m in modules):
        return None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in modules), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in modules]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in modules]))
    fused.requires_grad_(False)
    start = 0
    for m in modules:
        span = slice(start, start + m.out_features)
        m.weight = nn.Parameter(fused.weight[span], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(fused.bias[span], requires_grad=False)
        start += m.out_features
    return fused


# Each image's features from its pixels and grid (on the CPU), or None where an image is not needed.
ImageFeatures = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor | None]]


@dataclass
class PromptInputs:
    """Prompts ready for the layers, right-padded (row j's token t in column t), on the device:
    embeddings with the image features merged in, and GLM-4V's 3D rotary positions. Made once per
    prompt (the vision encoder runs once per image) and sliced by each chunk of its prefill."""

    hidden: torch.Tensor  # [rows, width, hidden]
    positions: torch.Tensor  # [3, rows, width]
    lengths: list[int]
    rope_deltas: list[int]

    def row(self, index: int) -> PromptInputs:
        """Row `index` alone, unpadded."""
        n = self.lengths[index]
        return PromptInputs(self.hidden[index:index + 1, :n], self.positions[:, index:index + 1, :n], [n],
                            [self.rope_deltas[index]])


@dataclass
class PromptChunk:
    """Where one prefill pass writes and what its attention reads, as the runner lays it out (on the
    device): columns start..start+width-1 of the prompts go to cache blocks `write_blocks` at offsets
    `write_offsets` [rows, width] (the scratch block for pad columns). With start > 0 (one row going on
    with its prompt), attention also reads the row's earlier positions, through `context_blocks` [1, n],
    of which `context_bounds` (engine/attention/continued_prompt.py) says how many count."""

    start: int
    width: int
    write_blocks: torch.Tensor
    write_offsets: torch.Tensor
    context_blocks: torch.Tensor | None = None
    context_bounds: torch.Tensor | None = None


class Glm4vDecoder:
    """Prefill through the HF model's modules into the paged cache; the decode step over it."""

    def __init__(self, model, cache: PagedKVCache, state: SlotState, eos_ids: set[int], device: torch.device,
                 decode_attention: PagedDecodeAttention) -> None:
        self.model = model
        self.language_model = language_model = model.model.language_model
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
        self.qkv_sizes = [self.heads * self.head_dim, *[self.kv_heads * self.head_dim] * 2]
        self._fuse_projections(device)
        self.cache, self.state = cache, state
        self.decode_attention = decode_attention
        vocab = self.lm_head.out_features
        # The split step's logits (`step_forward` -> `step_sample`), at a fixed address for CUDA graphs.
        self.logits = torch.zeros((state.active.shape[0], vocab), dtype=model.dtype, device=device)
        torch._dynamo.mark_static_address(self.logits)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.eos_mask[[i for i in sorted(eos_ids) if i < vocab]] = True
        # Positions attention can read in one row: every block its table can hold (a span is a prefix).
        self.span_ids = torch.arange(state.block_table.shape[1] * cache.block_size, device=device)
        torch._dynamo.mark_static(self.span_ids)  # a static size, as the cache's (see PagedKVCache)
        # compile_forward swaps in the compiled ones
        self._layer, self._prompt_layer, self._context_layer = self.layer, self.prompt_layer, self.context_layer
        self.varlen_vision = vision.use_varlen_attention(model, device)

    def _fuse_projections(self, device: torch.device) -> None:
        """Each layer's q, k and v projections as one module (`qkv_proj`): one weight read and one
        kernel where three ran, the small k and v ones far from the memory bandwidth. Where they are
        4-bit (int4_linear.fuse), and float ones on a GPU; float ones on a CPU stay three, keeping
        float32 results equal to generate()'s bit for bit (one matmul of the joined weight may sum in
        another order)."""
        for layer in self.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):  # fused already: by an earlier engine, or at load (gemlite_linear.py)
                continue
            projections = [attn.q_proj, attn.k_proj, attn.v_proj]
            fused = int4_linear.fuse(projections)
            if fused is None and device.type == "cuda":
                fused = fuse_linears(projections)
            if fused is not None:
                attn.qkv_proj = fused

    # ---- prefill ---------------------------------------------------------------------------

    def embed_prompts(self, inputs: dict[str, torch.Tensor], device: torch.device,
                      image_features: ImageFeatures | None = None) -> PromptInputs:
        """Left-padded prompts (engine/collate.py's layout, on the CPU) ready for `prefill`: embedded,
        images' features merged in, rotary positions computed (for the whole prompts, whatever
        columns will run), re-laid out right-padded.

        `image_features(pixel_values, image_grid_thw)` (both on the CPU) gives each image's features,
        or None for an image no column that will run holds (its tokens keep their plain embedding);
        by default every image is encoded."""
        position_ids, deltas = self.rope_positions(inputs)
        lengths = inputs["attention_mask"].sum(-1)
        width = inputs["input_ids"].shape[1]
        # Left- to right-padded: row j's token t moves from column pad_j + t to column t.
        pads = width - lengths
        columns = (torch.arange(width)[None, :] + pads[:, None]) % width
        host_ids = inputs["input_ids"].gather(1, columns)
        input_ids = upload(host_ids, device)
        positions = upload(position_ids.gather(2, columns[None].expand(3, -1, -1)), device)
        hidden = self.embed(input_ids)
        if "pixel_values" in inputs:
            if image_features is None:
                def image_features(pixels: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
                    return self.encode_images(upload(pixels, device), upload(grid, device))
            hidden = self.merge_images(host_ids, hidden, inputs["pixel_values"], inputs["image_grid_thw"],
                                       image_features)
        return PromptInputs(hidden, positions, lengths.tolist(), deltas)

    def prefill(self, prompts: PromptInputs, chunk: PromptChunk, last: torch.Tensor) -> torch.Tensor:
        """Run columns chunk.start..chunk.start+chunk.width-1 of `prompts` through the layers, their keys
        and values into the cache as `chunk` says; the logits [rows, vocab] at each row's column
        `last` [rows] (relative to chunk.start; the ones of rows whose prompt goes on are not used)."""
        columns = slice(chunk.start, chunk.start + chunk.width)
        return self.run_columns(prompts.hidden[:, columns], prompts.positions[:, :, columns], chunk, last)

    def run_columns(self, hidden: torch.Tensor, positions: torch.Tensor, chunk: PromptChunk,
                    last: torch.Tensor) -> torch.Tensor:
        """`prefill` on the chunk's own columns: `hidden` [rows, width, hidden] and `positions`
        [3, rows, width] (views allowed); for engine/continuous/prefill_graphs.py to capture."""
        # A copy of its own, as every later layer's input is: a compiled layer guards on its input's
        # storage offset, and would compile again for the first layer's view into the prompts.
        hidden = hidden.clone()
        cos, sin = self.language_model.rotary_emb(hidden, positions)
        if chunk.context_blocks is None:
            for layer, kv in zip(self.layers, self.cache.layers):
                hidden = self._prompt_layer(layer, kv, hidden, cos, sin, chunk.write_blocks, chunk.write_offsets)
        else:
            # Its [2, 2] never changes; left dynamic, duck sizing would equate its 2 with any other
            # size 2 of the first trace (say a 2-block context) and compile again when they differ.
            torch._dynamo.mark_static(chunk.context_bounds)
            for layer, kv in zip(self.layers, self.cache.layers):
                hidden = self._context_layer(layer, kv, hidden, cos, sin, chunk.write_blocks, chunk.write_offsets,
                                             chunk.context_blocks, chunk.context_bounds)
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.lm_head(self.norm(final))

    def merge_images(self, host_ids: torch.Tensor, embeds: torch.Tensor, pixel_values: torch.Tensor,
                     grid_thw: torch.Tensor, image_features: ImageFeatures) -> torch.Tensor:
        """The image features in place of the image tokens, as `Glm4vModel.forward` puts them; the
        tokens of an image without features (None) keep their embedding.

        The tokens are counted against the grids on the host (`host_ids`, `grid_thw` on the CPU), before
        any image is encoded: HF's `get_placeholder_mask` compares them on the device, which waits for
        the vision encoder. Image i's tokens are the next prod(grid_i) / merge^2 image tokens in row-major
        order (rows in batch order, images in prompt order), as the features are concatenated."""
        image_token = self.model.config.image_token_id
        merge = self.model.model.visual.spatial_merge_size ** 2
        mask = host_ids == image_token
        counts = grid_thw.prod(-1) // merge
        tokens, expected = int(mask.sum()), int(counts.sum())
        if tokens != expected:
            raise ValueError(f"Image features and image tokens do not match, tokens: {tokens}, features: {expected}")
        features = image_features(pixel_values, grid_thw)
        kept = torch.tensor([f is not None for f in features], dtype=torch.bool)
        if not kept.any():
            return embeds
        if not kept.all():  # only the tokens of the images that have features
            flat = mask.flatten()
            places = flat.nonzero()[:, 0]
            flat[places[~kept.repeat_interleave(counts)]] = False
            mask = flat.view_as(mask)
        merged = torch.cat([f for f in features if f is not None]).to(embeds.dtype)
        return embeds.masked_scatter(upload(mask, embeds.device)[..., None].expand_as(embeds), merged)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """The vision encoder's features of each image [its image tokens, hidden], one pass for all."""
        features = self.model.model.get_image_features(pixel_values.to(self.model.dtype), grid_thw).pooler_output
        return list(features)

    def warm_vision(self, device: torch.device) -> None:
        """Encode `vision.warm_up_images`: compiles the vision blocks (when compiled) and makes the
        first kernel choices before any request."""
        self.encode_images(*vision.warm_up_images(self.model, device))

    def rope_positions(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """GLM-4V's 3D positions for the prompts, and each row's delta for the tokens after them.

        Computed here (on the CPU tensors) rather than left to the model, which would keep the
        deltas in `model.model.rope_deltas`, state shared with any generate() call.
        """
        mask = inputs["attention_mask"]
        if "image_grid_thw" in inputs:
            # Past the last image placeholder every token is text, one position further in all three
            # components (pads are on the left), and the deltas are the same: transformers' walk, a
            # Python loop over the tokens, stops there, and the rest is an arange.
            types, width = inputs["mm_token_type_ids"], mask.shape[1]
            images = types.any(0).nonzero()
            cut = min(width, int(images[-1]) + 2) if len(images) else width
            positions, deltas = self.model.model.get_rope_index(
                inputs["input_ids"][:, :cut], mm_token_type_ids=types[:, :cut],
                image_grid_thw=inputs["image_grid_thw"], attention_mask=mask[:, :cut],
            )
            if cut < width:
                tail = positions[:, :, cut - 1:] + torch.arange(1, width - cut + 1)
                positions = torch.cat([positions, tail], dim=2)
            return positions, [int(d) for d in deltas.view(-1)]
        # Text only: plain positions over the unpadded tokens, as generate() numbers them.
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return text[None].expand(3, -1, -1), [0] * mask.shape[0]

    # ---- decode ----------------------------------------------------------------------------

    def step(self, active: torch.Tensor, span: torch.Tensor, any_sampled: bool, logprobs: bool = False) -> None:
        """One token for slots 0..B-1 (B = len(active)) attending over cache positions 0..L-1
        (L = len(span)); updates the slot state in place and leaves the tokens in `next_token` (and,
        with `logprobs`, their logprobs and the most likely tokens' in the state's logprob tensors).

        Inactive rows compute too (their slots are free or finished) but change nothing that a
        live sequence reads: their tokens, lengths and counters stay as they were.
        """
        self._sample(active, self.forward(active.shape[0], span), any_sampled, logprobs)

    def step_forward(self, active: torch.Tensor, span: torch.Tensor) -> None:
        """The first half of `step`: the forward pass, its logits kept in `self.logits` for `step_sample`.
        Split so that the host can prepare the sampling's inputs (grammar masks, which need the last
        step's tokens) while the device runs the forward pass."""
        rows = active.shape[0]
        self.logits[:rows].copy_(self.forward(rows, span))

    def step_sample(self, active: torch.Tensor, any_sampled: bool, logprobs: bool = False) -> None:
        """The second half of `step`, from the logits `step_forward` left."""
        self._sample(active, self.logits[:active.shape[0]], any_sampled, logprobs)

    def _sample(self, active: torch.Tensor, logits: torch.Tensor, any_sampled: bool, logprobs: bool) -> None:
        rows, state = active.shape[0], self.state
        tokens = state.last_token[:rows]
        generated = state.generated[:rows]
        params = RowParams(
            temperature=state.temperature[:rows], top_p=state.top_p[:rows], seed=state.seed[:rows],
            counter=generated, suppress_eos=state.ignore_eos[:rows] | (generated < state.min_tokens[:rows]),
            top_k=state.top_k[:rows], penalty=state.penalty[:rows], seen=state.seen[:rows],
            allowed=state.allowed[:rows],
        )
        processed = process(logits, params, self.eos_mask)
        chosen = choose(processed, params, any_sampled)
        if logprobs:
            found = step_logprobs(processed, chosen, MAX_TOP)
            state.chosen_logprob[:rows].copy_(found.chosen)
            state.top_ids[:rows].copy_(found.top_ids)
            state.top_logprobs[:rows].copy_(found.top_logprobs)
        state.mark_seen(state.seen[:rows], chosen, active)
        state.next_token[:rows].copy_(chosen)
        state.last_token[:rows].copy_(torch.where(active, chosen, tokens))
        state.length[:rows].add_(active.long())
        state.generated[:rows].add_(active.long())

    def forward(self, rows: int, span: torch.Tensor) -> torch.Tensor:
        """The language model over slots 0..rows-1: the next-token logits [rows, vocab], each new
        token's key/value written into its slot. Its layers are what `torch.compile` gets
        (`compile_forward`): sampling stays eager, since inductor has failed on its sort/scatter over
        the vocabulary, and inside a CUDA graph its few kernels cost nothing to launch anyway."""
        state = self.state
        tokens, length, active = state.last_token[:rows], state.length[:rows], state.active[:rows]
        hidden = self.embed(tokens)[:, None, :]
        cos, sin = self.rotary(length + state.rope_delta[:rows], hidden.dtype)
        block_size = self.cache.block_size
        table = state.block_table[:rows]
        # The new token's key/value goes to its row's block for position `length`; rows that are not
        # live write to the scratch block (their table may name blocks another row holds now).
        index = (length // block_size).clamp(max=table.shape[1] - 1)
        write_blocks = torch.where(active, table.gather(1, index[:, None])[:, 0], 0)
        write_offsets = length % block_size
        for layer, kv in zip(self.layers, self.cache.layers):
            hidden = self._layer(layer, kv, hidden, cos, sin, write_blocks, write_offsets, table, length, span)
        return self.lm_head(self.norm(hidden))[:, 0]

    def compile_forward(self, mode: str) -> None:
        """Have `forward` and `prefill` run torch.compile'd decoder layers, and the vision encoder
        compiled blocks where it runs varlen attention (`vision.py`). The layer, not the whole
        forward: the layers are one module class, and dynamo compiles the function once for all of
        them, its weights and cache tensors being arguments, where compiling the whole forward takes
        minutes for a large model. Dynamic shapes from the start: one compilation
        covers every batch size, span and prompt width, plus one for batch 1 (PyTorch specialises
        sizes of 1)."""
        self._layer = torch.compile(self.layer, mode=mode, fullgraph=False, dynamic=True)
        self._prompt_layer = torch.compile(self.prompt_layer, mode=mode, fullgraph=False, dynamic=True)
        self._context_layer = torch.compile(self.context_layer, mode=mode, fullgraph=False, dynamic=True)
        if self.varlen_vision:  # HF's per-image attention would recompile for each new number of images
            vision.compile_blocks(self.model, mode)

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

    def layer(self, layer, kv: LayerCache, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              write_blocks: torch.Tensor, write_offsets: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
              span: torch.Tensor) -> torch.Tensor:
        """Glm4vTextDecoderLayer.forward for one token per row, attention over positions 0..length of
        each row's blocks (`table` [rows, max_blocks]), at most len(span) of them. (The whole table:
        a slice passed in would be one more dynamic size, which dynamo's duck sizing equates with any
        other of the same value, recompiling when they differ.)"""
        attended = self.attention(layer.self_attn, kv, layer.input_layernorm(hidden), cos, sin, write_blocks,
                                  write_offsets, table, lengths, span.shape[0])
        return self.feed_forward(layer, hidden, attended)

    def prompt_layer(self, layer, kv: LayerCache, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     write_blocks: torch.Tensor, write_offsets: torch.Tensor) -> torch.Tensor:
        """Glm4vTextDecoderLayer.forward for the first chunk of right-padded prompts [rows, width, hidden]."""
        attended = self.prompt_attention(layer.self_attn, kv, layer.input_layernorm(hidden), cos, sin, write_blocks,
                                         write_offsets)
        return self.feed_forward(layer, hidden, attended)

    def context_layer(self, layer, kv: LayerCache, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      write_blocks: torch.Tensor, write_offsets: torch.Tensor, context: torch.Tensor,
                      bounds: torch.Tensor) -> torch.Tensor:
        """Glm4vTextDecoderLayer.forward for a later chunk of one prompt [1, width, hidden], attention
        over its earlier positions too."""
        attended = self.context_attention(layer.self_attn, kv, layer.input_layernorm(hidden), cos, sin, write_blocks,
                                          write_offsets, context, bounds)
        return self.feed_forward(layer, hidden, attended)

    @staticmethod
    def feed_forward(layer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the decoder layer after attention: both residual adds, the MLP, GLM's extra norms."""
        hidden = residual + layer.post_self_attn_layernorm(attended)
        return hidden + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(hidden)))

    def project(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries [rows, T, heads, head_dim], keys and values [rows, T, kv_heads, head_dim], rotated.

        Rows, tokens, heads: the projections' own layout, kept through the rotary and the cache
        write (transposing to heads-first before them cost a strided copy per tensor per layer);
        attention kernels take the heads-first views with these strides as they are."""
        rows, tokens = x.shape[:2]
        if hasattr(attn, "qkv_proj"):
            q, k, v = attn.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(rows, tokens, self.heads, self.head_dim)
        k = k.view(rows, tokens, self.kv_heads, self.head_dim)
        v = v.view(rows, tokens, self.kv_heads, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q, k, v

    def attention(self, attn, kv: LayerCache, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  write_blocks: torch.Tensor, write_offsets: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
                  span: int) -> torch.Tensor:
        rows = x.shape[0]
        q, k, v = self.project(attn, x, cos, sin)
        self.cache.format.store(kv, write_blocks, write_offsets, k[:, 0], v[:, 0])
        groups = self.heads // self.kv_heads
        out = self.decode_attention(q.reshape(rows, self.kv_heads, groups, self.head_dim), kv, table, lengths, span,
                                    self.scaling)
        return attn.o_proj(out.reshape(rows, 1, self.heads * self.head_dim))

    def prompt_attention(self, attn, kv: LayerCache, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         write_blocks: torch.Tensor, write_offsets: torch.Tensor) -> torch.Tensor:
        rows, width = x.shape[:2]
        q, k, v = self.project(attn, x, cos, sin)
        # One scatter per tensor for every row and column ([rows, width] indices). Attention then reads
        # the fresh k and v, not what the cache keeps of them (for an int8 cache, as vLLM does too).
        self.cache.format.store(kv, write_blocks, write_offsets, k, v)
        # enable_gqa: the kernels read each key/value head for its group of query heads, where
        # repeating them first cost a copy as long as the attention itself.
        with sdpa_kernel(PROMPT_ATTENTION_BACKENDS):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scaling,
                enable_gqa=True,
            )
        return attn.o_proj(out.transpose(1, 2).reshape(rows, width, self.heads * self.head_dim))

    def context_attention(self, attn, kv: LayerCache, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          write_blocks: torch.Tensor, write_offsets: torch.Tensor, context: torch.Tensor,
                          bounds: torch.Tensor) -> torch.Tensor:
        rows, width = x.shape[:2]
        q, k, v = self.project(attn, x, cos, sin)
        self.cache.format.store(kv, write_blocks, write_offsets, k, v)
        # The earlier positions as the cache keeps them (dequantized from an int8 cache), this chunk's own included.
        keys, values = self.cache.format.load(kv, context, q.dtype)
        out = continued_prompt_attention(q, keys, values, bounds, self.scaling)
        return attn.o_proj(out.reshape(rows, width, self.heads * self.head_dim))
