"""The generation engine the VLMServer drives: a transformers image-text-to-text model, batched.

A batch of requests runs through one `model.generate()` call with left padding. Two hooks make each
row behave as if it ran alone:
- `_RowSampler` (a logits processor) samples every row with that request's own temperature, top_p
  and seeded generator, and hands `generate` a one-hot choice, so greedy rows stay exactly greedy;
- `_RowStepper` (a stopping criterion, which `generate` calls once per step with the new tokens)
  detokenizes each row, applies its stop sequences, max_tokens and cancellation, and emits the
  new text at once, so a row that finishes leaves the batch's output immediately.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from engine.checkpoints import checkpoint_source
from engine.prompts import PreparedRequest, Prompter
from engine.quant.gptq import describe, describe_quantization, generation_kwargs, load_kwargs, prepare_model
from serve_app.settings import ModelSettings
from serve_app.stage_types import GenerationChunk, GenerationRequest

logger = logging.getLogger("ray.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # a model YAML's dtype


# Emits one step's new chunks, one entry per row (None: nothing new for that row this step).
StepCallback = Callable[[list[GenerationChunk | None]], None]


def _random_weights(source: str, dtype: torch.dtype, device: torch.device):
    """The checkpoint's architecture with freshly initialised weights, made on `device` directly
    (a 10B model is built in a second there, where initialising it on a CPU takes minutes)."""
    config = AutoConfig.from_pretrained(source)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: the defaults derived from the config stay
        pass
    return model


class Engine:
    """Prompts in, streamed text out, over a model and processor already in memory."""

    continuous = False  # runs each batch to its end (ContinuousEngine: requests join and leave per step)

    def __init__(self, settings: ModelSettings, model, processor, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model = model
        self._generation_extra = generation_kwargs(settings.quantization)
        self.prompter = Prompter(settings, processor)
        self.eos_token_ids: set[int] = self._eos_ids()
        self.pad_token_id: int = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        )
        # Read by the replica's health check: a batch in progress must keep making steps.
        self.busy = False
        self.last_step_at = time.monotonic()
        quant = getattr(model.config, "quantization_config", None)
        self.quantization = describe(settings.quantization, "none" if quant is None else describe_quantization(quant))

    @classmethod
    def load(cls, settings: ModelSettings) -> "Engine":
        """Load the checkpoint `settings` names (the demo one is built if missing) onto its device."""
        source = checkpoint_source(settings)
        device = torch.device(
            settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        dtype = DTYPES.get(settings.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        processor = AutoProcessor.from_pretrained(source)
        if settings.load_format == "dummy":
            model = _random_weights(source, dtype, device)
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                source, dtype=dtype, **load_kwargs(source, device, settings.quantization)
            )
            prepare_model(model, source, device, settings.quantization)
        engine = cls(settings, model.to(device).eval(), processor, device)
        logger.info("Loaded %s on %s (%s, quantization=%s%s)", source, device, dtype, engine.quantization,
                    ", random weights" if settings.load_format == "dummy" else "")
        return engine

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return set(ids)

    # ---- preparing one request ---------------------------------------------------------------

    def render_prompt(self, request: GenerationRequest) -> str:
        return self.prompter.render(request)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        return self.prompter.prepare(request)

    def cancel(self, request: PreparedRequest) -> None:
        """The client went away (or the request ended): the engine drops the row at its next step."""
        request.cancelled = True

    # ---- running a batch ---------------------------------------------------------------------

    @torch.inference_mode()
    def generate_batch(self, batch: list[PreparedRequest], on_step: StepCallback) -> None:
        """Run `batch` to completion, calling `on_step` with each step's new text (blocking)."""
        inputs = self._collate(batch)
        rows = [_RowState(request, _Detokenizer(self.tokenizer, request.sampling.stop)) for request in batch]
        self.busy, self.last_step_at = True, time.monotonic()
        try:
            self._generate(inputs, batch, rows, on_step)
        finally:
            self.busy = False
        # generate() may stop at its own max_new_tokens before a row hit its stop condition.
        finals: list[GenerationChunk | None] = [row.finish("length") for row in rows]
        if any(finals):
            on_step(finals)

    def _generate(self, inputs: dict, batch: list[PreparedRequest], rows: list["_RowState"], on_step: StepCallback) -> None:
        def heartbeat() -> None:
            self.last_step_at = time.monotonic()

        self.model.generate(
            **inputs,
            generation_config=GenerationConfig(
                max_new_tokens=max(r.max_tokens for r in batch),
                do_sample=False,  # _RowSampler already chose; argmax over its one-hot picks that
                eos_token_id=None,  # end-of-sequence is decided per row by _RowStepper
                pad_token_id=self.pad_token_id,
                **self._generation_extra,
            ),
            logits_processor=LogitsProcessorList([_RowSampler(rows, self.eos_token_ids, self.device)]),
            stopping_criteria=StoppingCriteriaList([_RowStepper(rows, self.eos_token_ids, on_step, heartbeat)]),
        )

    @torch.inference_mode()
    def probe(self) -> None:
        """One tiny forward pass: raises if the model can no longer run (e.g. a broken device)."""
        self.model(input_ids=torch.tensor([[self.pad_token_id]], device=self.device))

    def _collate(self, batch: list[PreparedRequest], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for `batch`, on `device` (default: the model's)."""
        width = max(r.prompt_tokens for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        mm_types = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = r.prompt_tokens
            input_ids[i, width - n:] = torch.tensor(r.input_ids)
            attention_mask[i, width - n:] = 1
            if r.mm_token_type_ids is not None:
                mm_types[i, width - n:] = torch.tensor(r.mm_token_type_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if any(r.mm_token_type_ids is not None for r in batch):
            inputs["mm_token_type_ids"] = mm_types
        pixels = [r.pixel_values for r in batch if r.pixel_values is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.model.dtype)
            inputs["image_grid_thw"] = torch.tensor([g for r in batch for g in r.image_grid_thw])
        return {k: v.to(device or self.device) for k, v in inputs.items()}


def _decodes_piecewise(tokenizer) -> bool:
    """Whether decoding a token list equals decoding two parts of it and joining the texts, for any
    split after which the first part's text is whole (does not end in U+FFFD, half a character).

    True for byte-level BPE (GLM's tokenizer, the demo's): decoding concatenates each token's bytes
    and reads them as UTF-8, so a split at a character boundary changes nothing; unless the
    tokenizer cleans up spaces around punctuation afterwards, which looks across the split.
    """
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel" and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False


class _Detokenizer:
    """Turns a growing token list into text deltas, holding back what a stop sequence might claim."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already emitted
        # Decoding the whole answer at every token costs O(length) per token (~0.2 ms at 1,000
        # tokens, times every sequence of a step); where the tokenizer allows, only the tokens
        # after the last whole-character point are decoded again.
        self._piecewise = _decodes_piecewise(tokenizer)
        self._settled_text = ""
        self._settled = 0  # tokens whose text is _settled_text

    def _text(self) -> str:
        tail = self._tokenizer.decode(self.tokens[self._settled:], skip_special_tokens=True)
        text = self._settled_text + tail
        if self._piecewise and not tail.endswith("\ufffd"):
            self._settled_text, self._settled = text, len(self.tokens)
        return text

    def add(self, token: int) -> tuple[str, bool]:
        """The text that is now safe to emit, and whether a stop sequence was met."""
        self.tokens.append(token)
        text = self._text()
        for stop in self._stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                return self._take(text[:at]), True
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return "", False
        return self._take(text[: len(text) - self._held_back(text)]), False

    def flush(self) -> str:
        text = self._text().rstrip("\ufffd")
        return self._take(text)

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop sequence."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _take(self, text: str) -> str:
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta


@dataclass
class _RowState:
    request: PreparedRequest
    detokenizer: _Detokenizer
    generator: torch.Generator | None = None
    done: bool = False
    generated: int = 0

    def chunk(self, text: str, finish_reason: str | None = None) -> GenerationChunk:
        return GenerationChunk(
            text=text,
            prompt_tokens=self.request.prompt_tokens,
            completion_tokens=self.generated,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            image_tokens=self.request.image_tokens,
        )

    def finish(self, reason: str) -> GenerationChunk | None:
        if self.done:
            return None
        self.done = True
        return self.chunk(self.detokenizer.flush(), reason)

    def advance(self, token: int, eos_ids: set[int]) -> GenerationChunk | None:
        """Take the row's next sampled token: the text it makes safe to send, and whether it ends
        the row (end of sequence, a stop sequence, max_tokens, or the client went away). Both
        engines call this once per step and row, so their stop semantics cannot drift apart."""
        if self.request.cancelled:
            self.done = True
            logger.info("Dropped a cancelled request from its batch after %d tokens", self.generated)
            return None
        if token in eos_ids and not self.request.sampling.ignore_eos:
            return self.finish("stop")
        self.generated += 1
        text, stopped = self.detokenizer.add(token)
        if stopped:
            self.done = True
            return self.chunk(text, "stop")
        if self.generated >= self.request.max_tokens:
            self.done = True
            return self.chunk(text + self.detokenizer.flush(), "length")
        return self.chunk(text) if text else None


class _RowSampler(LogitsProcessor):
    """Samples each row with its own parameters; returns scores whose argmax is the sampled token."""

    def __init__(self, rows: list[_RowState], eos_ids: set[int], device: torch.device) -> None:
        self._rows = rows
        self._eos = torch.tensor(sorted(eos_ids), device=device)
        for row in rows:
            params = row.request.sampling
            if not params.greedy:
                row.generator = torch.Generator(device=device)
                if params.seed is not None:
                    row.generator.manual_seed(params.seed)
                else:
                    row.generator.seed()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for i, row in enumerate(self._rows):
            params = row.request.sampling
            logits = scores[i]
            if params.ignore_eos or row.generated < params.min_tokens:
                logits = logits.index_fill(0, self._eos, float("-inf"))
            if row.done or params.greedy:
                chosen[i] = logits.argmax()
            else:
                chosen[i] = _sample(logits, params.temperature, params.top_p, row.generator)
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot.scatter_(1, chosen[:, None], 0.0)
        return one_hot


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least the first).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return order[torch.multinomial(sorted_probs, 1, generator=generator)][0]
    return torch.multinomial(probs, 1, generator=generator)[0]


class _RowStepper(StoppingCriteria):
    """Called by generate() after every step: emits each row's new text and decides who is done."""

    def __init__(
        self, rows: list[_RowState], eos_ids: set[int], on_step: StepCallback, heartbeat: Callable[[], None]
    ) -> None:
        self._rows = rows
        self._eos = eos_ids
        self._on_step = on_step
        self._heartbeat = heartbeat

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self._heartbeat()
        new_tokens = input_ids[:, -1].tolist()
        chunks: list[GenerationChunk | None] = []
        for row, token in zip(self._rows, new_tokens):
            chunks.append(None if row.done else row.advance(token, self._eos))
        if any(chunks):
            self._on_step(chunks)
        return torch.tensor([row.done for row in self._rows], device=input_ids.device)
