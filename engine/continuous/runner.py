"""ModelRunner: the continuous engine's tensors and model calls.

It owns the slot KV cache and the per-slot device state (slots.py), the decoder that prefills into
and decodes over them (engine/models/glm4v/decoder.py) and the step runner that replays the decode
step from CUDA graphs where enabled (graphs.py). The scheduler decides which rows run; the runner
runs them:
- `prefill`: new prompts into their slots (vision encoder once per image, and not at all for an
  image in the encoder cache, encoder_cache.py, or wholly inside a cached prefix), their sampling
  parameters into the slot state, and their first tokens sampled on the device;
- `decode`: one decode step over slots 0..B-1;
- each returns the sampled tokens as `Pending`: a copy to the host already under way, read later
  (`Pending.read`, the one host-device synchronisation per step), so the host can stream one step's
  tokens while the device computes the next;
- `free`: a finished slot refilled from the last live one (the scheduler's `SlotMove`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.attention.kv_format import KV_FORMATS
from engine.attention.paged_decode import decode_attention
from engine.continuous.blocks import SCRATCH_BLOCK, blocks_for
from engine.continuous.encoder_cache import EncoderCache
from engine.continuous.graphs import StepRunner
from engine.continuous.prefill_graphs import ContinuedChunkGraphs
from engine.continuous.sampling import RowParams, choose, process
from engine.continuous.scheduler import DecodeBatch, PrefillBatch, PrefillChunk, SlotMove, SlotRow
from engine.continuous.slots import PagedKVCache, SlotState
from engine.loader import LoadedModel
from engine.logprobs import MAX_TOP, StepLogprobs, step_logprobs
from engine.models.glm4v.decoder import Glm4vDecoder, PromptChunk, PromptInputs, unsupported_reason, upload
from engine.prompts import PreparedRequest

logger = logging.getLogger("ray.serve")


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def seed_key(seed: int, choice: int = 0) -> int:
    """The sampler's 32-bit key for a request's seed (and which of its n choices). A hash of the whole
    seed, so seeds that differ only in their high bits still give different streams (up to the 2**-32
    chance of two keys meeting); each choice its own stream, the first the seed's alone."""
    raw = seed.to_bytes((seed.bit_length() + 8) // 8, "little", signed=True)
    if choice:
        raw += b"/choice" + choice.to_bytes(4, "little")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=4).digest(), "little")


@dataclass
class Pending:
    """Sampled tokens on their way to the host, one per row of the step that made them, with their
    logprobs where the step computed them."""

    tokens: torch.Tensor  # on the host (pinned on CUDA), filled once `ready` has passed
    ready: Any = None  # torch.cuda.Event, None on the CPU
    logprobs: StepLogprobs | None = None  # on the host too

    def read(self) -> list[int]:
        """The tokens; waits for the step that made them (on CUDA) where it has not ended yet."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class ModelRunner:
    """Prefill and decode over a paged KV cache, on the model `loaded` holds (see the module docstring)."""

    def __init__(self, loaded: LoadedModel) -> None:
        settings, model, device = loaded.settings, loaded.model, loaded.device
        reason = unsupported_reason(model, settings.quantization.kv_cache)
        if reason is not None:
            raise ValueError(f"The continuous engine cannot run this model: {reason}")
        self.loaded = loaded
        self.device = device
        self.options = options = settings.continuous
        text = model.config.get_text_config(decoder=True)
        attention = model.model.language_model.layers[0].self_attn
        layers, kv_heads, head_dim = text.num_hidden_layers, attention.num_key_value_heads, attention.head_dim
        self.slots = options.max_slots
        self.max_len = settings.max_model_len
        block_size = options.block_size
        kv_format = KV_FORMATS[settings.quantization.kv_cache]  # the model's dtype, or int8 (kv_format.py)
        num_blocks = self._blocks_that_fit(PagedKVCache.block_bytes(layers, block_size, kv_heads, head_dim, model.dtype,
                                                                    kv_format))
        self.cache = PagedKVCache(layers, num_blocks, block_size, kv_heads, head_dim, model.dtype, device, kv_format)
        # One entry more than a max_model_len sequence needs: a span is then always a strict prefix of
        # the table, where a span of all of it is another case to torch.compile (contiguity), compiled
        # again, minutes on a GPU, the first time a sequence grows that long.
        max_blocks = blocks_for(self.max_len, block_size) + 1
        self.state = SlotState(self.slots, model.lm_head.out_features, max_blocks, device)
        self.decoder = Glm4vDecoder(model, self.cache, self.state, loaded.eos_token_ids, device,
                                    decode_attention(options.decode_attention, device, kv_format))
        self.steps = StepRunner(self.decoder, options, device)
        # Continued prompt chunks (after a cached prefix, or a long prompt's later chunks) from CUDA graphs too.
        self.prefill_graphs = (ContinuedChunkGraphs(self.decoder, options.max_prefill_tokens, max_blocks, device)
                               if self.steps.use_graphs else None)
        self._seeds = random.Random()
        # The prompt whose prefill goes on in later passes, embedded once (its images encoded once).
        self._partial: tuple[SlotRow, PromptInputs] | None = None
        self.encoder_cache = EncoderCache(options.encoder_cache_bytes)  # vision features by image digest
        self._bitmask: torch.Tensor | None = None  # grammar bitmasks on the host, one row per slot
        if device.type == "cuda" and options.switch_interval_s is not None:
            # The engine thread relaunches the GPU every decode step. Python hands the GIL over only
            # every 5 ms by default, so while the replica's event loop streams tokens each step could
            # start that late.
            sys.setswitchinterval(options.switch_interval_s)

    def _blocks_that_fit(self, block_bytes: int) -> int:
        """kv_cache_blocks where set; else, on a GPU, what kv_cache_memory_fraction of the free memory
        holds, and elsewhere enough for max_slots full-length sequences (plus the scratch block)."""
        options = self.options
        if options.kv_cache_blocks is not None:
            return options.kv_cache_blocks
        if self.device.type != "cuda":
            return self.slots * blocks_for(self.max_len, options.block_size) + 1
        free, _ = torch.cuda.mem_get_info(self.device)
        blocks = int(free * options.kv_cache_memory_fraction // block_bytes)
        if blocks < blocks_for(self.max_len, options.block_size) + 1:
            raise ValueError(f"The KV cache fits {blocks} blocks of {options.block_size} tokens in "
                             f"{options.kv_cache_memory_fraction:.0%} of the free GPU memory, not one "
                             f"{self.max_len}-token sequence; lower max_model_len")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %d tokens)", blocks, options.block_size,
                    blocks * block_bytes / 2**30, (blocks - 1) * options.block_size)
        return blocks

    # ---- prefill ----------------------------------------------------------------------------------

    def prefill(self, batch: PrefillBatch) -> tuple[Pending | None, int]:
        """Run one pass of prompt chunks (see PrefillBatch) into their blocks, and start the rows whose
        prompt completes: their slots' tables and state, and their first tokens sampled.

        Returns those tokens on their way to the host (None: no prompt completed), and the padded
        prompt tokens the pass ran. Raises what the model raised (e.g. image tokens that do not
        match the pixels); then no live slot was touched.
        """
        graphs, started = compiled_graphs(), time.monotonic()
        computed = batch.computed
        if all(chunk.begins for chunk in computed):
            self._partial = None  # a prompt left part-way (its request went away) is not continued
        # Each computed row's logits at its last column and its rope delta.
        outputs: dict[int, tuple[torch.Tensor, int]] = {}
        together = [chunk for chunk in computed if chunk.begins and chunk.start == 0]
        tokens = self._run(together, self._embed(together), outputs) if together else 0
        for chunk in computed:
            if chunk.begins and chunk.start > 0:  # after a cached prefix: embedded alone, runs alone
                tokens += self._run([chunk], self._embed([chunk]), outputs)
            elif not chunk.begins:
                row, prompts = self._partial
                assert row is chunk.row and len(computed) == 1, "a continued prompt runs alone"
                tokens += self._run([chunk], prompts, outputs)
        if compiled_graphs() != graphs:  # every live sequence waited for it
            logger.warning("The prefill of %d prompts (%d tokens) compiled new graphs (%.1fs): a shape the warm-up "
                           "did not cover", len(computed), tokens, time.monotonic() - started)
        done = [chunk for chunk in batch.chunks if chunk.completes]
        if not done:
            return None, tokens
        for chunk in done:
            if chunk.copy_of is not None:
                self.cache.copy_blocks(chunk.copy_of.blocks, chunk.row.blocks[:len(chunk.copy_of.blocks)])
        # A copy's logits and rope delta are its leader's.
        logits, deltas = zip(*(outputs[id(chunk.copy_of or chunk.row)] for chunk in done))
        pending = self._start([chunk.row for chunk in done], batch.first_slot, torch.stack(logits), list(deltas))
        return pending, tokens

    def _run(self, chunks: list[PrefillChunk], prompts: PromptInputs,
             outputs: dict[int, tuple[torch.Tensor, int]]) -> int:
        """One decoder pass over `chunks` (row j of `prompts` is chunk j's prompt): their logits and
        rope deltas into `outputs`; the prompt that goes on in later passes kept, embedded. Returns the
        padded tokens it ran."""
        width = max(chunk.end - chunk.start for chunk in chunks)
        last = self._to_device([[chunk.end - chunk.start - 1 for chunk in chunks]], torch.long)[0]
        layout = self._layout(chunks, width)
        key = self.prefill_graphs.key(layout) if self.prefill_graphs is not None else None
        logits = self._continued_from_graph(key, prompts, layout, last) if key is not None else None
        if logits is None:
            logits = self.decoder.prefill(prompts, layout, last)
        for j, chunk in enumerate(chunks):
            outputs[id(chunk.row)] = logits[j], prompts.rope_deltas[j]
            if not chunk.completes:
                self._partial = (chunk.row, prompts.row(j))
            elif self._partial is not None and self._partial[0] is chunk.row:
                self._partial = None
        return len(chunks) * width

    def _continued_from_graph(self, key: tuple[int, int], prompts: PromptInputs, layout: PromptChunk,
                              last: torch.Tensor) -> torch.Tensor | None:
        """A continued chunk's logits from its CUDA graph; None (and no graphs from now on) if the
        capture failed: serving on without them beats failing every cached turn."""
        try:
            return self.prefill_graphs.run(key, prompts, layout, last)
        except Exception:
            logger.exception("Capturing the continued-prompt graph %s failed: continued prompts run without "
                             "CUDA graphs from now on", key)
            self.prefill_graphs.enabled = False
            return None

    def _embed(self, chunks: list[PrefillChunk]) -> PromptInputs:
        """The prompts of chunks that begin them, embedded together. An image whose placeholders all lie
        before its chunk's start (in the blocks the prefix cache gave) is not encoded: nothing runs
        them; the others' features come from the encoder cache, else from the vision encoder (and are
        kept in the cache, under the image's digest and the request's cache_salt: tenants apart there too)."""
        requests = [prompt_request(chunk.row) for chunk in chunks]
        needed: list[bool] = []
        keys: list[tuple[str | None, str] | None] = []
        for chunk, request in zip(chunks, requests):
            count = len(request.image_grid_thw)
            spans = chunk.row.spans  # None: the row's blocks are not keyed; it begins at 0
            needed += [True] * count if spans is None else [span.end > chunk.start for span in spans]
            hashes = request.image_hashes
            keys += [(request.cache_salt, h) for h in hashes] if len(hashes) == count else [None] * count
        # No pixels where no image is needed: a 1024x1024 image's are 25 MB to copy for nothing.
        inputs = self.loaded.collate(requests, torch.device("cpu"), pixels=any(needed))
        return self.decoder.embed_prompts(inputs, self.device,
                                          lambda pixels, grid: self._image_features(pixels, grid, needed, keys))

    def _image_features(self, pixels: torch.Tensor, grid: torch.Tensor, needed: list[bool],
                        keys: list[tuple[str | None, str] | None]) -> list[torch.Tensor | None]:
        """Image i's features (None where not `needed`): from the encoder cache under `keys[i]`, else
        encoded, all missing ones in one pass of the vision encoder. `pixels` and `grid` are on the CPU."""
        features: list[torch.Tensor | None] = [None] * len(needed)
        missing = []
        for i, (wanted, key) in enumerate(zip(needed, keys)):
            if wanted:
                features[i] = self.encoder_cache.get(key)
                if features[i] is None:
                    missing.append(i)
        if missing:
            patches = grid.prod(-1).tolist()  # image i's rows of `pixels` start at offsets[i]
            offsets = [0, *itertools.accumulate(patches)]
            if len(missing) < len(patches):
                pixels = torch.cat([pixels[offsets[i]:offsets[i + 1]] for i in missing])
                grid = grid[missing]
            encoded = self.decoder.encode_images(upload(pixels, self.device), upload(grid, self.device))
            for i, made in zip(missing, encoded):
                features[i] = made
                if keys[i] is not None and self.encoder_cache.budget_bytes:
                    # A copy: the encoder's output for one image is a view of the whole pass's.
                    self.encoder_cache.put(keys[i], made.clone())
        return features

    def _layout(self, chunks: list[PrefillChunk], width: int) -> PromptChunk:
        """Where each column of the pass writes (block, offset; the scratch block for pads), and the
        blocks a continued prompt reads: computed on the host from the rows' block lists."""
        block_size = self.cache.block_size
        blocks = torch.full((len(chunks), width), SCRATCH_BLOCK, dtype=torch.long)
        offsets = torch.zeros((len(chunks), width), dtype=torch.long)
        for j, chunk in enumerate(chunks):
            positions = torch.arange(chunk.start, chunk.end)
            blocks[j, :len(positions)] = torch.tensor(chunk.row.blocks, dtype=torch.long)[positions // block_size]
            offsets[j, :len(positions)] = positions % block_size
        write_blocks, write_offsets = self._to_device([blocks.tolist(), offsets.tolist()], torch.long)
        first = chunks[0]
        context = bounds = None
        if first.start > 0:
            context = self._to_device([first.row.blocks[:blocks_for(first.end, block_size)]], torch.long)
            bounds = self._to_device([[0, width], [0, first.end]], torch.int32)
        return PromptChunk(first.start, width, write_blocks, write_offsets, context, bounds)

    def _start(self, rows: list[SlotRow], first_slot: int, logits: torch.Tensor, rope_deltas: list[int]) -> Pending:
        """Fill the new slots' tables and state and sample each prompt's first token (on the device).
        A row resumed after a preemption goes on where it was: its sampling counter is the number of
        tokens it already has."""
        count = len(rows)
        span = slice(first_slot, first_slot + count)
        params = params_of(rows)
        keys = [seed_key(row.request.sampling.seed, row.request.choice) if row.request.sampling.seed is not None
                else self._seeds.getrandbits(32) for row in rows]
        # A grammar decides where its row ends: no min_tokens or ignore_eos for those (RowState.suppresses_eos).
        free = [row.grammar is None for row in rows]
        length, rope_delta, min_tokens, ignore_eos, seed, top_k, counter = self._to_device([
            [len(row.prompt_ids) for row in rows], rope_deltas, [p.min_tokens * f for p, f in zip(params, free)],
            [int(p.ignore_eos and f) for p, f in zip(params, free)], keys, [p.top_k for p in params],
            [len(row.output_ids) for row in rows],
        ], torch.long)
        temperature, top_p, penalty = self._to_device([
            [0.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params],
            [p.repetition_penalty for p in params],
        ], torch.float32)
        ignore_eos = ignore_eos.bool()
        state = self.state
        for target, values in ((state.length, length), (state.rope_delta, rope_delta), (state.min_tokens, min_tokens),
                               (state.seed, seed), (state.ignore_eos, ignore_eos), (state.temperature, temperature),
                               (state.top_p, top_p), (state.top_k, top_k), (state.penalty, penalty)):
            target[span].copy_(values)
        self._write_tables(rows, first_slot)
        self._mark_prompts(rows, first_slot)
        state.allowed[span] = -1
        self._write_grammars([(first_slot + i, row) for i, row in enumerate(rows)])
        seen = state.seen[span]
        params = RowParams(temperature, top_p, seed, counter=counter, suppress_eos=ignore_eos | (counter < min_tokens),
                           top_k=top_k, penalty=penalty, seen=seen, allowed=state.allowed[span])
        processed = process(logits, params, self.decoder.eos_mask)
        first = choose(processed, params, any(not p.greedy for p in params_of(rows)))
        found = None
        if any(p.logprobs is not None for p in params_of(rows)):
            found = step_logprobs(processed, first, MAX_TOP)
        state.mark_seen(seen, first, torch.ones(count, dtype=torch.bool, device=self.device))
        state.last_token[span].copy_(first)
        state.generated[span].copy_(counter + 1)
        state.active[span] = True
        return self._to_host(first, found)

    def _write_grammars(self, slots: list[tuple[int, SlotRow]]) -> None:
        """The slots' grammar bitmasks for their next token, for those of the rows that have a grammar
        (filled on the host by xgrammar, copied to the slot state)."""
        constrained = [(slot, row) for slot, row in slots if row.grammar is not None and not row.done]
        if not constrained:
            return
        from engine.grammar.matcher import allocate_bitmask, fill_bitmask  # xgrammar: only once a grammar comes

        if self._bitmask is None:
            self._bitmask = allocate_bitmask(self.slots, self.state.allowed.shape[1] * 32)
            if self.device.type == "cuda":
                self._bitmask = self._bitmask.pin_memory()
        indices = [slot for slot, _ in constrained]
        fill_bitmask(self._bitmask, [row.grammar for _, row in constrained], indices)
        index = torch.tensor(indices, dtype=torch.long)
        self.state.allowed[index.to(self.device)] = self._bitmask[index].to(self.device, non_blocking=True)

    def _write_tables(self, rows: list[SlotRow], first_slot: int) -> None:
        """The new slots' block tables: each row's blocks, then the scratch block."""
        table = torch.full((len(rows), self.state.block_table.shape[1]), SCRATCH_BLOCK, dtype=torch.long)
        for j, row in enumerate(rows):
            table[j, :len(row.blocks)] = torch.tensor(row.blocks, dtype=torch.long)
        self.state.block_table[first_slot:first_slot + len(rows)].copy_(self._to_device(table.tolist(), torch.long))

    def _mark_prompts(self, rows: list[SlotRow], first_slot: int) -> None:
        """The new slots' seen-token sets: empty, then each penalized row's prompt (and output) tokens."""
        state = self.state
        state.seen[first_slot:first_slot + len(rows)] = False
        vocab = state.seen.shape[1]
        slots, tokens = [], []
        for offset, row in enumerate(rows):
            if row.request.sampling.repetition_penalty != 1.0:
                ids = [t for t in row.prompt_ids if t < vocab]
                slots += [first_slot + offset] * len(ids)
                tokens += ids
        if tokens:
            index = self._to_device([slots, tokens], torch.long)
            state.seen[index[0], index[1]] = True

    # ---- decoding ---------------------------------------------------------------------------------

    def decode(self, batch: DecodeBatch) -> Pending | None:
        """Apply the batch's slot moves and new blocks, then launch one decode step over slots
        0..batch.bucket-1 (live ones: the first len(batch.rows)); None when no row is left to step."""
        if not self._prepare(batch):
            return None
        self._write_grammars(list(enumerate(batch.rows)))
        self.steps.run((batch.bucket, batch.span, batch.sampled, batch.logprobs))
        return self._outputs(batch)

    def forward(self, batch: DecodeBatch) -> bool:
        """As `decode`, the step's forward pass alone (False: no row is left to step); `sample` ends it.
        Meanwhile the host may read the last step's tokens, which the next grammar masks need."""
        if not self._prepare(batch):
            return False
        self.steps.run_forward(batch.bucket, batch.span)
        return True

    def sample(self, batch: DecodeBatch) -> Pending:
        """The second half of the step `forward` began: grammar masks from the rows' matchers as they
        are now, then sampling."""
        self._write_grammars(list(enumerate(batch.rows)))
        self.steps.run_sample(batch.bucket, batch.sampled, batch.logprobs)
        return self._outputs(batch)

    def _prepare(self, batch: DecodeBatch) -> bool:
        """The batch's slot moves and new blocks into the device state; whether any row is left."""
        for move in batch.moves:
            self.free(move)
        if batch.grown:
            slots, indices, blocks = self._to_device([[g.slot for g in batch.grown], [g.index for g in batch.grown],
                                                      [g.block for g in batch.grown]], torch.long)
            self.state.block_table[slots, indices] = blocks
        return bool(batch.rows)

    def _outputs(self, batch: DecodeBatch) -> Pending:
        rows, state = len(batch.rows), self.state
        found = None
        if batch.logprobs:
            found = StepLogprobs(state.chosen_logprob[:rows], state.top_ids[:rows], state.top_logprobs[:rows])
        return self._to_host(state.next_token[:rows], found)

    def free(self, move: SlotMove) -> None:
        """Apply one of the scheduler's slot moves to the slot state (tables move; keys and values stay)."""
        if move.source != move.slot:
            self.state.move(move.source, move.slot)
        self.state.clear(move.source)

    def reset(self) -> None:
        """After a failed step: no slot is live any more (the device may be gone: then it is logged)."""
        self._partial = None
        try:
            self.state.active.zero_()
            self.state.length.zero_()
            self.state.block_table.zero_()
        except Exception:
            logger.exception("Could not reset the slot state")

    # ---- host <-> device ------------------------------------------------------------------------

    def _to_device(self, rows: list[list[float]], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(rows, dtype=dtype)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _to_host(self, tokens: torch.Tensor, found: StepLogprobs | None = None) -> Pending:
        """Copies of the step's outputs on their way to the host (the state's tensors are the next
        step's to write)."""
        if self.device.type != "cuda":
            return Pending(tokens.clone(), None, found and StepLogprobs(*(t.clone() for t in vars(found).values())))

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            return host.copy_(tensor, non_blocking=True)

        host = copy(tokens)
        logprobs = found and StepLogprobs(*(copy(t) for t in vars(found).values()))
        ready = torch.cuda.Event()
        ready.record()
        return Pending(host, ready, logprobs)

    # ---- health and warm-up -------------------------------------------------------------------------

    @torch.inference_mode()
    def probe(self) -> None:
        """One tiny forward pass of the model; raises if it can no longer run."""
        self.loaded.model(input_ids=torch.tensor([[self.loaded.pad_token_id]], device=self.device))

    def warmup(self, buckets: list[int]) -> None:
        """Compile and capture before any request: the prefill, the vision encoder, and the decode step
        at every batch bucket and cache span up to `warmup_max_len`."""
        started = time.monotonic()
        self.warm_prefill()
        logger.info("Warmed the prefill up in %.1fs", time.monotonic() - started)
        spans, span = [], self.options.min_length_bucket
        while span <= min(self.options.warmup_max_len, self.max_len):
            spans.append(span)
            span *= 2
        started = time.monotonic()
        self.steps.warmup(buckets, spans)
        logger.info("Captured %d decode graphs in %.1fs", self.steps.captured, time.monotonic() - started)

    def warm_prefill(self) -> None:
        """Encode two small images, prefill text prompts of pad tokens at batch 3 and 1 into the scratch
        block, and one continued chunk: the first real requests would otherwise wait for the
        compilation of the vision blocks and prompt layers and for the first kernel choices. Odd
        sizes: a dynamic-shape graph first traced on even ones can assume their alignment and be
        compiled again later."""
        self.decoder.warm_vision(self.device)
        width = 17
        for rows in (3, 1):
            ids = torch.full((rows, width), self.loaded.pad_token_id, dtype=torch.long)
            prompts = self.decoder.embed_prompts({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, self.device)
            self.decoder.prefill(prompts, self.scratch_chunk(rows, width), self._last(rows, width))
        self.decoder.prefill(prompts, self.scratch_chunk(1, 7, start=width - 7), self._last(1, 7))

    def scratch_chunk(self, rows: int, width: int, start: int = 0) -> PromptChunk:
        """A prefill chunk that writes only to the scratch block (and, after `start` > 0, reads it as its
        context): for warming up and measuring the prefill without touching any sequence."""
        # Blocks and offsets as two tensors, as they always are: passing one twice is another case to compile.
        blocks = torch.full((rows, width), SCRATCH_BLOCK, dtype=torch.long, device=self.device)
        context = bounds = None
        if start > 0:
            context = torch.full((1, blocks_for(start + width, self.cache.block_size)), SCRATCH_BLOCK,
                                 dtype=torch.long, device=self.device)
            bounds = torch.tensor([[0, width], [0, start + width]], dtype=torch.int32, device=self.device)
        return PromptChunk(start, width, blocks, blocks.clone(), context, bounds)

    def _last(self, rows: int, width: int) -> torch.Tensor:
        return torch.full((rows,), width - 1, dtype=torch.long, device=self.device)

def params_of(rows: list[SlotRow]) -> list:
    return [row.request.sampling for row in rows]


def prompt_request(row: SlotRow) -> PreparedRequest:
    """What `row`'s prefill runs: its request, or, resumed after a preemption, its request with the
    output so far appended (as text tokens)."""
    request = row.request
    if row.resume_ids is None:
        return request
    extra = len(row.resume_ids) - request.prompt_tokens
    mm_types = None if request.mm_token_type_ids is None else [*request.mm_token_type_ids, *[0] * extra]
    return replace(request, input_ids=row.resume_ids, mm_token_type_ids=mm_types)
