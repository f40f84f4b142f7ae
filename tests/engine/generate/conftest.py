"""The generate() engine over the committed demo checkpoint (the trained one, loaded as the server loads it),
and a helper that runs requests through one batch and collects each one's stream."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from engine.generate.engine import GenerateEngine
from engine.loader import load_model
from serve_app.settings import ModelSettings
from serve_app.stage_types import (
    GenerationChunk,
    GenerationRequest,
    PromptMessage,
    SamplingParams,
    TextPart,
    TokenLogprob,
)

CHECKPOINT = "checkpoints/glm4v-demo-vqa"


@pytest.fixture(scope="package")
def engine() -> Iterator[GenerateEngine]:
    made = GenerateEngine(load_model(ModelSettings(id="demo", path=CHECKPOINT, max_model_len=1024)))
    yield made
    made.close()


@dataclass
class Stream:
    """What one request's stream delivered."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    chunks: list[GenerationChunk] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def last(self) -> GenerationChunk:
        return self.chunks[-1]


def ask(text: str, **sampling) -> GenerationRequest:
    params = SamplingParams(**{"max_tokens": 200, "temperature": 0.0, **sampling})
    return GenerationRequest([PromptMessage("user", (TextPart(text),))], [], params)


def run(engine: GenerateEngine, requests: list[GenerationRequest]) -> list[Stream]:
    """Each request's stream through one batch of `engine`."""
    streams = [Stream() for _ in requests]

    def on_step(entries) -> None:
        for stream, entry in zip(streams, entries):
            if entry is None:
                continue
            assert stream.error is None and not (stream.chunks and stream.last.finish_reason), "emitted after its end"
            if isinstance(entry, BaseException):
                stream.error = entry
                continue
            stream.chunks.append(entry)
            stream.text += entry.text
            stream.logprobs += entry.logprobs or ()

    engine.generate_batch([engine.prepare(r) for r in requests], on_step)
    return streams
