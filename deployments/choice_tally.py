"""Where a request's chunk stream stands: the latest chunk of each of its n choices.

The model stage interleaves the chunks of a request's n choices (GenerationChunk.choice); each carries
its choice's cumulative completion_tokens, and each choice's last chunk its finish_reason. So the
request has finished only when every choice has, and what it used is the shared prompt once plus each
choice's latest completion_tokens (serve_app/openai/choices.py `usage`). The ingress's metrics and its
rate-limit budget both read the stream this way.
"""

from __future__ import annotations

from serve_app.openai.choices import usage
from serve_app.openai.protocol import CompletionUsage
from serve_app.stage_types import GenerationChunk


class ChoiceTally:
    """The latest chunk of each of a request's `n` choices, as its stream goes by."""

    def __init__(self, n: int) -> None:
        self._lasts: list[GenerationChunk | None] = [None] * n

    def add(self, chunk: GenerationChunk) -> None:
        self._lasts[chunk.choice] = chunk

    @property
    def finished(self) -> bool:
        """Every choice has sent its finish_reason."""
        return all(last is not None and last.finish_reason is not None for last in self._lasts)

    def usage(self) -> CompletionUsage:
        """The tokens used so far: the prompt once, every choice's completion; zero before any chunk."""
        seen = [last for last in self._lasts if last is not None]
        return usage(seen) if seen else CompletionUsage.of(0, 0, 0)
