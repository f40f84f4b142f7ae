"""GenerateEngine: any transformers image-text-to-text model, each batch through one `generate()` call.

Batches run one at a time, in the order submitted, on the engine's own thread; a batch submitted
while another runs waits for it. Each batch is collated left-padded and run by `model.generate()`
with two hooks that make each row behave as if it ran alone:
- `GrammarMask` (a logits processor, engine/generate/grammar.py), where a row has a grammar: masks
  each such row's logits to what its grammar allows next;
- `RowSampler` (a logits processor, engine/generate/sampling.py) samples every row with its own
  parameters and hands `generate()` a one-hot choice, so greedy rows stay exactly greedy; it keeps
  the step's logprobs of the rows that asked for them;
- `_RowStepper` (a stopping criterion, which `generate()` calls once per step with the new tokens)
  advances each row (`RowState.advance`: its grammar, detokenizing, stop sequences, max_tokens,
  cancellation, logprobs) and emits the new text at once, so a row that finishes leaves the batch's
  output immediately.
This is the engine for models the continuous engine does not implement, and for a quantized KV cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from engine.generate.grammar import GrammarMask
from engine.generate.sampling import RowSampler
from engine.grammar.errors import GrammarError
from engine.in_process import InProcessEngine
from engine.loader import LoadedModel
from engine.prompts import PreparedRequest
from engine.protocol import StepCallback, StepOutput, deliver
from engine.quant.gptq import generation_kwargs
from engine.rows import RowState

logger = logging.getLogger("ray.serve")


class GenerateEngine(InProcessEngine):
    """The engine interface over `model.generate()`, one batch at a time."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        self._generation_extra = generation_kwargs(loaded.settings.quantization)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._lock = threading.Lock()
        self._outstanding = 0  # batches submitted and not finished
        self._rows: list[RowState] = []  # the running batch's
        self._last_step_at = time.monotonic()
        self._closed = False

    # ---- requests -------------------------------------------------------------------------------

    def submit(self, batch: list[PreparedRequest], on_step: StepCallback) -> Future:
        if not batch:
            done: Future = Future()
            done.set_result(None)
            return done
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._outstanding == 0:  # the stall clock starts now, not at the last batch's end
                self._last_step_at = time.monotonic()
            self._outstanding += 1
        future = self._executor.submit(self._run, batch, on_step)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: Future) -> None:
        with self._lock:
            self._outstanding -= 1

    def cancel(self, request: PreparedRequest) -> None:
        request.cancelled = True

    # ---- health -----------------------------------------------------------------------------------

    def probe(self) -> None:
        """One tiny forward pass on the engine's thread, after the batches submitted before it."""
        self._executor.submit(self._forward_one_token).result()

    @torch.inference_mode()
    def _forward_one_token(self) -> None:
        self.loaded.model(input_ids=torch.tensor([[self.loaded.pad_token_id]], device=self.loaded.device))

    @property
    def busy(self) -> bool:
        return self._outstanding > 0

    @property
    def last_step_at(self) -> float:
        return self._last_step_at

    @property
    def live(self) -> int:
        return sum(not row.done for row in self._rows)

    def close(self) -> None:
        """Fail the running batch's rows at its next step and the batches still queued, then stop the
        engine's thread."""
        with self._lock:
            self._closed = True
        for row in list(self._rows):
            row.fail(RuntimeError("the engine was closed"))
        self._executor.shutdown(wait=True)

    # ---- running a batch (on the engine's thread) --------------------------------------------------

    @torch.inference_mode()
    def _run(self, batch: list[PreparedRequest], on_step: StepCallback) -> None:
        if self._closed:
            raise RuntimeError("the engine was closed")
        self._last_step_at = time.monotonic()
        rows = [self._row(request) for request in batch]
        inputs = self.loaded.collate(batch)
        width = inputs["input_ids"].shape[1]
        texts = self.token_texts if any(r.sampling.logprobs is not None for r in batch) else None
        sampler = RowSampler(rows, [width - r.prompt_tokens for r in batch], self.loaded.eos_token_ids,
                             self.loaded.device, texts)
        processors = [sampler]
        if any(row.grammar is not None for row in rows):
            processors.insert(0, GrammarMask(rows, self.grammars.vocab_size))
        self._rows = rows
        try:
            self.loaded.model.generate(
                **inputs,
                generation_config=GenerationConfig(
                    max_new_tokens=max(r.max_tokens for r in batch),
                    do_sample=False,  # RowSampler already chose; argmax over its one-hot picks that
                    eos_token_id=None,  # end-of-sequence is decided per row by _RowStepper
                    pad_token_id=self.loaded.pad_token_id,
                    **self._generation_extra,
                ),
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([_RowStepper(rows, sampler, self.loaded.eos_token_ids,
                                                                    on_step, self._heartbeat)]),
            )
        finally:
            self._rows = []
        # generate() may stop at its own max_new_tokens before a row met its stop condition.
        finals: list[StepOutput] = [row.take_error() or row.finish("length") for row in rows]
        if any(entry is not None for entry in finals):
            deliver(on_step, finals)

    def _row(self, request: PreparedRequest) -> RowState:
        """A row for `request`, at the start of its grammar if it has one (failed if that cannot compile)."""
        row = RowState(request, self.detokenizer_type(self.loaded.tokenizer, request.sampling.stop))
        if request.sampling.grammar is not None:
            try:
                row.grammar = self.grammars.matcher(request.sampling.grammar)
            except GrammarError as error:
                row.fail(error)
        return row

    def _heartbeat(self) -> None:
        self._last_step_at = time.monotonic()


class _RowStepper(StoppingCriteria):
    """Called by generate() after every step: emits each row's new text and decides who is done."""

    def __init__(self, rows: list[RowState], sampler: RowSampler, eos_ids: frozenset[int], on_step: StepCallback,
                 heartbeat: Callable[[], None]) -> None:
        self._rows = rows
        self._sampler = sampler  # holds the step's logprobs
        self._eos = eos_ids
        self._on_step = on_step
        self._heartbeat = heartbeat

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self._heartbeat()
        new_tokens = input_ids[:, -1].tolist()
        entries: list[StepOutput] = []
        for row, token, logprob in zip(self._rows, new_tokens, self._sampler.logprobs):
            error = row.take_error()  # failed in this step's sampling: its token is not its own
            if error is not None or row.done:
                entries.append(error)
                continue
            chunk = row.advance(token, self._eos, logprob)
            entries.append(row.take_error() or chunk)  # the error: its token broke its grammar
        if any(entry is not None for entry in entries):
            deliver(self._on_step, entries)
        return torch.tensor([row.done for row in self._rows], device=input_ids.device)
