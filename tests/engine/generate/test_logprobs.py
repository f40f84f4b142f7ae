"""Logprobs in the generate() engine with the demo model: from the logits each token was sampled from
(penalised and masked as the sampler saw them, before its temperature), checked against the model run
again over the prompt and the output."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from engine.generate.engine import GenerateEngine
from engine.generate.sampling import penalize
from serve_app.stage_types import GrammarSpec
from tests.engine.generate.conftest import Stream, ask, run

QUESTION = "How many circles are there?"


@torch.inference_mode()
def expected_logprobs(engine: GenerateEngine, stream: Stream, penalty: float = 1.0) -> tuple[torch.Tensor, list[int]]:
    """log_softmax of the model's logits for each output token, from one forward pass over the prompt and
    the output (the repetition penalty applied over the tokens before each), as [tokens, vocab]; and the
    output's token ids (read back from the entries' bytes)."""
    prompt = engine.prepare(ask(QUESTION))
    by_bytes = {token: i for i, token in enumerate(engine.grammars.token_bytes) if token}
    output = [by_bytes[bytes(e.bytes)] for e in stream.logprobs]
    ids = prompt.input_ids + output
    full = dataclasses.replace(prompt, input_ids=ids, mm_token_type_ids=[0] * len(ids))
    logits = engine.loaded.model(**engine.loaded.collate([full])).logits[0].float()
    rows = [penalize(logits[p - 1], torch.tensor(ids[:p]), penalty) for p in range(len(prompt.input_ids), len(ids))]
    return torch.log_softmax(torch.stack(rows), dim=-1), output


def check_against_the_model(engine: GenerateEngine, stream: Stream, penalty: float = 1.0) -> None:
    expected, output = expected_logprobs(engine, stream, penalty)
    for position, (token, entry) in enumerate(zip(output, stream.logprobs)):
        assert entry.logprob == pytest.approx(expected[position, token].item(), abs=1e-4)
        top = expected[position].topk(len(entry.top))
        assert [alt.logprob for alt in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_each_token_has_its_logprob_and_the_alternatives_asked_for(engine: GenerateEngine) -> None:
    streams = run(engine, [ask(QUESTION, max_tokens=24, logprobs=5), ask(QUESTION, max_tokens=24, logprobs=0),
                           ask(QUESTION, max_tokens=24)])
    greedy, no_alternatives, unasked = streams
    assert len(greedy.logprobs) == greedy.last.completion_tokens == 24
    assert all(len(e.top) == 5 for e in greedy.logprobs)
    assert all([a.logprob for a in e.top] == sorted((a.logprob for a in e.top), reverse=True) for e in greedy.logprobs)
    assert all(e.top[0].token == e.token and e.top[0].logprob == e.logprob for e in greedy.logprobs)  # greedy
    assert "".join(e.token for e in greedy.logprobs) == greedy.text
    assert bytes(b for e in greedy.logprobs for b in e.bytes).decode() == greedy.text
    check_against_the_model(engine, greedy)
    assert [e.token for e in no_alternatives.logprobs] == [e.token for e in greedy.logprobs]
    assert all(e.top == () for e in no_alternatives.logprobs)
    assert all(chunk.logprobs is None for chunk in unasked.chunks) and unasked.text == greedy.text


def test_sampled_logprobs_do_not_depend_on_the_temperature_but_include_the_penalty(engine: GenerateEngine) -> None:
    hot, penalised = run(engine, [ask(QUESTION, max_tokens=16, logprobs=3, temperature=1.5, seed=7),
                                  ask(QUESTION, max_tokens=16, logprobs=3, temperature=0.7, seed=7,
                                      repetition_penalty=1.5)])
    # The text leaves out a character cut in half at the end; the bytes have all of every token.
    assert bytes(b for e in hot.logprobs for b in e.bytes).decode(errors="replace").startswith(hot.text)
    check_against_the_model(engine, hot)
    check_against_the_model(engine, penalised, penalty=1.5)


def test_a_grammar_rows_logprobs_see_only_what_the_grammar_allows(engine: GenerateEngine) -> None:
    stream = run(engine, [ask(QUESTION, logprobs=20, grammar=GrammarSpec("json_object"))])[0]
    assert isinstance(json.loads(stream.text), dict)
    first = stream.logprobs[0]
    assert (first.token, first.logprob, [a.token for a in first.top]) == ("{", 0.0, ["{"])  # nothing else allowed
    assert len(stream.logprobs) == stream.last.completion_tokens
