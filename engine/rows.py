"""RowState: one request's progress through an engine, the stop rules both engines share.

Each engine samples a token per live row and step, then hands it to `RowState.advance`, which
decides what the client sees: the text the detokenizer makes safe to send, and whether the row ends
(end of sequence unless `ignore_eos`, a stop sequence, `max_tokens`, the end of the row's grammar,
or the client went away). One implementation for both engines, so their stop semantics cannot drift
apart. No torch: the continuous engine's scheduler keeps these rows too.

A row with a grammar (`SamplingParams.grammar`) holds its `RowMatcher`: `advance` moves it past
every sampled token, and the grammar, not `ignore_eos` or `min_tokens`, decides where the output may
end (`suppresses_eos`). A row that asked for logprobs collects one `TokenLogprob` per token it
counts; each chunk carries those collected since the row's previous chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.detokenizer import Detokenizer
from serve_app.stage_types import GenerationChunk, TokenLogprob

if TYPE_CHECKING:  # a prepared request holds tensors and a matcher imports xgrammar; the rows only call them
    from engine.grammar.matcher import RowMatcher
    from engine.prompts import PreparedRequest

logger = logging.getLogger("ray.serve")


@dataclass(eq=False)
class RowState:
    """One request in an engine: its detokenizer, tokens generated so far, and whether it is done."""

    request: PreparedRequest
    detokenizer: Detokenizer
    grammar: RowMatcher | None = None  # where the row stands in its grammar, if it has one
    done: bool = False
    generated: int = 0
    # Set by `fail`: the row's own error, handed to its stream once (`take_error`); the other rows go on.
    error: BaseException | None = None
    # The logprobs of the tokens counted since the last chunk (when the request asked for them).
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def suppresses_eos(self) -> bool:
        """Whether the next token must not be end-of-sequence: `ignore_eos`, or fewer than `min_tokens`
        so far. Never for a row with a grammar: its grammar decides where the output may end, and
        once the output is complete allows nothing but end-of-sequence."""
        params = self.request.sampling
        return self.grammar is None and (params.ignore_eos or self.generated < params.min_tokens)

    def chunk(self, text: str, finish_reason: str | None = None) -> GenerationChunk:
        logprobs = None
        if self.request.sampling.logprobs is not None:
            logprobs, self.logprobs = tuple(self.logprobs), []
        return GenerationChunk(
            text=text,
            prompt_tokens=self.request.prompt_tokens,
            completion_tokens=self.generated,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            image_tokens=self.request.image_tokens,
            logprobs=logprobs,
        )

    def finish(self, reason: str) -> GenerationChunk | None:
        """End the row now (if it has not ended): its last chunk, with whatever text was held back."""
        if self.done:
            return None
        self.done = True
        return self.chunk(self.detokenizer.flush(), reason)

    def fail(self, error: BaseException) -> None:
        """End the row with its own error (e.g. its sampling parameters cannot be used)."""
        if not self.done:
            self.done = True
            self.error = error

    def take_error(self) -> BaseException | None:
        """The row's error if it failed since the last call; None otherwise."""
        error, self.error = self.error, None
        return error

    def advance(self, token: int, eos_ids: set[int] | frozenset[int],
                logprob: TokenLogprob | None = None) -> GenerationChunk | None:
        """Take the row's next sampled token and its logprob (where the request asked for them): the
        chunk to send (None: nothing new to send yet).

        Called once per step for every row that is not done. Ends the row (`done`) on end of
        sequence (finish_reason "stop", unless `ignore_eos` and no grammar), the end of its grammar
        ("stop"), a stop sequence ("stop"), `max_tokens` ("length"), or a cancelled request (no
        chunk: nobody is listening). A token its grammar does not allow fails the row (`fail`; the
        engine sampled it without the row's mask): None, and `take_error` has the error.
        The end-of-sequence token is not counted, and has no logprob entry.
        """
        if self.request.cancelled:
            self.done = True
            logger.info("Dropped a cancelled request from its batch after %d tokens", self.generated)
            return None
        if self.grammar is not None and not self.grammar.accept(token):
            self.fail(RuntimeError(f"Token {token} is not allowed by the request's grammar at this point"))
            return None
        ends = token in eos_ids and (self.grammar is not None or not self.request.sampling.ignore_eos)
        if ends or (self.grammar is not None and self.grammar.terminated):
            return self.finish("stop")
        self.generated += 1
        if logprob is not None and self.request.sampling.logprobs is not None:
            self.logprobs.append(logprob)
        text, stopped = self.detokenizer.add(token)
        if stopped:
            self.done = True
            return self.chunk(text, "stop")
        if self.generated >= self.request.max_tokens:
            self.done = True
            return self.chunk(text + self.detokenizer.flush(), "length")
        return self.chunk(text) if text else None
