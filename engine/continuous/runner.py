"""ModelRunner: the continuous engine's tensors and model calls.

It owns the slot KV cache and the per-slot device state (slots.py), the decoder that prefills into
and decodes over them (engine/models/glm4v/decoder.py) and the step runner that replays the decode
step from CUDA graphs where enabled (graphs.py). The scheduler decides which rows run; the runner
runs them:
- `prefill`: new prompts into their slots (vision encoder once per image), their sampling
  parameters into the slot state, and their first tokens sampled on the device;
- `decode`: one decode step over slots 0..B-1;
- each returns the sampled tokens as `Pending`: a copy to the host already under way, read later
  (`Pending.read`, the one host-device synchronisation per step), so the host can stream one step's
  tokens while the device computes the next;
- `free`: a finished slot refilled from the last live one (the scheduler's `SlotMove`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.continuous.graphs import StepRunner
from engine.continuous.sampling import RowParams, sample
from engine.continuous.scheduler import DecodeBatch, SlotMove
from engine.continuous.slots import SlotKVCache, SlotState
from engine.loader import LoadedModel
from engine.models.glm4v.decoder import Glm4vDecoder, unsupported_reason
from engine.prompts import PreparedRequest

logger = logging.getLogger("ray.serve")


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def seed_key(seed: int) -> int:
    """The sampler's 32-bit key for a request's seed. A hash of the whole seed, so seeds that differ
    only in their high bits still give different streams (up to the 2**-32 chance of two keys meeting)."""
    raw = seed.to_bytes((seed.bit_length() + 8) // 8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=4).digest(), "little")


@dataclass
class Pending:
    """Sampled tokens on their way to the host, one per row of the step that made them."""

    tokens: torch.Tensor  # on the host (pinned on CUDA), filled once `ready` has passed
    ready: Any = None  # torch.cuda.Event, None on the CPU

    def read(self) -> list[int]:
        """The tokens; waits for the step that made them (on CUDA) where it has not ended yet."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class ModelRunner:
    """Prefill and decode over a slot KV cache, on the model `loaded` holds (see the module docstring)."""

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
        shape = (text.num_hidden_layers, attention.num_key_value_heads, settings.max_model_len, attention.head_dim)
        self.slots = self._slots_that_fit(shape, model.dtype)
        self.cache = SlotKVCache(shape[0], self.slots, shape[1], shape[2], shape[3], model.dtype, device)
        self.state = SlotState(self.slots, model.lm_head.out_features, device)
        self.decoder = Glm4vDecoder(model, self.cache, self.state, loaded.eos_token_ids, device)
        self.steps = StepRunner(self.decoder, options, device)
        self._seeds = random.Random()
        if device.type == "cuda" and options.switch_interval_s is not None:
            # The engine thread relaunches the GPU every decode step. Python hands the GIL over only
            # every 5 ms by default, so while the replica's event loop streams tokens each step could
            # start that late.
            sys.setswitchinterval(options.switch_interval_s)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _slots_that_fit(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> int:
        """max_slots, or fewer where a GPU's free memory cannot hold that many full-length slots."""
        wanted = self.options.max_slots
        if self.device.type != "cuda":
            return wanted
        layers, kv_heads, max_len, head_dim = shape
        positions = max_len + 1  # SlotKVCache's spare position included
        per_slot = 2 * layers * kv_heads * positions * head_dim * torch.empty((), dtype=dtype).element_size()
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int(free * self.options.kv_cache_memory_fraction // per_slot)
        if fits < wanted:
            logger.warning("The KV cache fits %d slots of %d tokens (%.2f GiB each) in %.0f%% of the %.1f GiB free, "
                           "not max_slots=%d; lower max_model_len for more", fits, max_len, per_slot / 2**30,
                           100 * self.options.kv_cache_memory_fraction, free / 2**30, wanted)
        if fits < 1:
            raise ValueError(f"Not even one KV cache slot of {max_len} tokens fits in the free GPU memory")
        return min(wanted, fits)

    # ---- prefill ----------------------------------------------------------------------------------

    def prefill(self, requests: list[PreparedRequest], first_slot: int) -> tuple[Pending, int]:
        """Prefill `requests` into slots first_slot, first_slot + 1, ... and sample their first tokens.

        Returns the tokens on their way to the host, and the padded prompt tokens the pass ran.
        Raises what the model raised (e.g. image tokens that do not match the pixels); then no live
        slot was touched.
        """
        graphs, started = compiled_graphs(), time.monotonic()
        inputs = self.loaded.collate(requests, torch.device("cpu"))
        prefill = self.decoder.prefill(inputs, first_slot, self.device)
        if compiled_graphs() != graphs:  # every live sequence waited for it
            logger.warning("The prefill of %d prompts x %d tokens compiled new graphs (%.1fs): a shape the warm-up "
                           "did not cover", *inputs["input_ids"].shape, time.monotonic() - started)
        return self._start(requests, first_slot, prefill.logits, prefill.rope_deltas), inputs["input_ids"].numel()

    def _start(self, requests: list[PreparedRequest], first_slot: int, logits: torch.Tensor,
               rope_deltas: list[int]) -> Pending:
        """Fill the new slots' state and sample each prompt's first token (on the device)."""
        rows = len(requests)
        span = slice(first_slot, first_slot + rows)
        params = [r.sampling for r in requests]
        keys = [seed_key(p.seed) if p.seed is not None else self._seeds.getrandbits(32) for p in params]
        length, rope_delta, min_tokens, ignore_eos, seed, top_k = self._to_device([
            [r.prompt_tokens for r in requests], rope_deltas, [p.min_tokens for p in params],
            [int(p.ignore_eos) for p in params], keys, [p.top_k for p in params],
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
        self._mark_prompts(requests, first_slot)
        zero = torch.zeros(rows, dtype=torch.long, device=self.device)
        seen = state.seen[span]
        first = sample(logits, RowParams(temperature, top_p, seed, counter=zero,
                                         suppress_eos=ignore_eos | (min_tokens > 0), top_k=top_k, penalty=penalty,
                                         seen=seen),
                       self.decoder.eos_mask, any(not p.greedy for p in params))
        state.mark_seen(seen, first, torch.ones(rows, dtype=torch.bool, device=self.device))
        state.last_token[span].copy_(first)
        state.generated[span].copy_(zero + 1)
        state.active[span] = True
        return self._to_host(first)

    def _mark_prompts(self, requests: list[PreparedRequest], first_slot: int) -> None:
        """The new slots' seen-token sets: empty, then each penalized request's prompt tokens."""
        state = self.state
        state.seen[first_slot:first_slot + len(requests)] = False
        vocab = state.seen.shape[1]
        slots, tokens = [], []
        for offset, request in enumerate(requests):
            if request.sampling.repetition_penalty != 1.0:
                ids = [t for t in request.input_ids if t < vocab]
                slots += [first_slot + offset] * len(ids)
                tokens += ids
        if tokens:
            index = self._to_device([slots, tokens], torch.long)
            state.seen[index[0], index[1]] = True

    # ---- decoding ---------------------------------------------------------------------------------

    def decode(self, batch: DecodeBatch) -> Pending:
        """Launch one decode step over slots 0..batch.bucket-1 (live ones: the first len(batch.rows))."""
        self.steps.run((batch.bucket, batch.span, batch.sampled))
        return self._to_host(self.state.next_token[:len(batch.rows)])

    def free(self, move: SlotMove) -> None:
        """Apply one of the scheduler's slot moves to the cache and the slot state."""
        if move.source != move.slot:
            self.cache.move(move.source, move.slot, move.length)
            self.state.move(move.source, move.slot)
        self.state.clear(move.source)

    def reset(self) -> None:
        """After a failed step: no slot is live any more (the device may be gone: then it is logged)."""
        try:
            self.state.active.zero_()
            self.state.length.zero_()
        except Exception:
            logger.exception("Could not reset the slot state")

    # ---- host <-> device ------------------------------------------------------------------------

    def _to_device(self, rows: list[list[float]], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(rows, dtype=dtype)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _to_host(self, tokens: torch.Tensor) -> Pending:
        if self.device.type != "cuda":
            return Pending(tokens.clone())
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Pending(host, ready)

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
        while span <= min(self.options.warmup_max_len, self.cache.max_len):
            spans.append(span)
            span *= 2
        started = time.monotonic()
        self.steps.warmup(buckets, spans)
        logger.info("Captured %d decode graphs in %.1fs", self.steps.captured, time.monotonic() - started)

    def warm_prefill(self) -> None:
        """Encode two small images, and prefill text prompts of pad tokens at batch 3 and 1 into free
        slots: the first real requests would otherwise wait for the compilation of the vision blocks and
        prompt layers and for the first kernel choices. Odd sizes: a dynamic-shape graph first traced on
        even ones can assume their alignment and be compiled again later."""
        self.decoder.warm_vision(self.device)
        for rows in sorted({min(3, self.slots), 1}, reverse=True):
            ids = torch.full((rows, 17), self.loaded.pad_token_id, dtype=torch.long)
            self.decoder.prefill({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0, self.device)
