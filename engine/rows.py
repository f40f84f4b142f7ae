"""RowState: one request's progress through an engine, the stop rules both engines share.

Each engine samples a token per live row and step, then hands it to `RowState.advance`, which
decides what the client sees: the text the detokenizer makes safe to send, and whether the row ends
(end of sequence unless `ignore_eos`, a stop sequence, `max_tokens`, or the client went away). One
implementation for both engines, so their stop semantics cannot drift apart. No torch: the
continuous engine's scheduler keeps these rows too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.detokenizer import Detokenizer
from serve_app.stage_types import GenerationChunk

if TYPE_CHECKING:  # a prepared request holds tensors; the rows only read its plain fields
    from engine.prompts import PreparedRequest

logger = logging.getLogger("ray.serve")


@dataclass(eq=False)
class RowState:
    """One request in an engine: its detokenizer, tokens generated so far, and whether it is done."""

    request: PreparedRequest
    detokenizer: Detokenizer
    done: bool = False
    generated: int = 0
    # Set by `fail`: the row's own error, handed to its stream once (`take_error`); the other rows go on.
    error: BaseException | None = None

    def chunk(self, text: str, finish_reason: str | None = None) -> GenerationChunk:
        return GenerationChunk(
            text=text,
            prompt_tokens=self.request.prompt_tokens,
            completion_tokens=self.generated,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            image_tokens=self.request.image_tokens,
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

    def advance(self, token: int, eos_ids: set[int] | frozenset[int]) -> GenerationChunk | None:
        """Take the row's next sampled token: the chunk to send (None: nothing new to send yet).

        Called once per step for every row that is not done. Ends the row (`done`) on end of
        sequence (finish_reason "stop", unless `ignore_eos`), a stop sequence ("stop"), `max_tokens`
        ("length"), or a cancelled request (no chunk: nobody is listening).
        """
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
