"""RowState with a grammar and with logprobs: where a constrained row ends, and which chunk carries which
token's logprob. Real grammars over the demo tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import Detokenizer
from engine.grammar.compiler import GrammarCompiler
from engine.prompts import PreparedRequest
from engine.rows import RowState
from serve_app.stage_types import GenerationChunk, GrammarSpec, SamplingParams, TokenLogprob

CHECKPOINT = "checkpoints/glm4v-demo-vqa"
EOS = frozenset({0, 7, 9})


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), EOS)


def row_for(tokenizer, compiler: GrammarCompiler | None = None, max_tokens: int = 50, **sampling) -> RowState:
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    request = PreparedRequest([1, 2, 3], None, None, [], params, max_tokens)
    grammar = compiler.matcher(params.grammar) if params.grammar is not None else None
    return RowState(request, Detokenizer(tokenizer, params.stop), grammar=grammar)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def entry(name: str) -> TokenLogprob:
    return TokenLogprob(name, -1.0, tuple(name.encode()))


def test_a_grammar_row_ends_at_end_of_sequence_even_with_ignore_eos(tokenizer, compiler) -> None:
    row = row_for(tokenizer, compiler, grammar=GrammarSpec("json_object"), ignore_eos=True, min_tokens=10)
    assert not row.suppresses_eos  # the grammar decides where it may end
    for token in ids(tokenizer, "{}"):
        row.advance(token, EOS)
    last = row.advance(7, EOS)
    assert row.done and row.grammar.terminated
    assert last.finish_reason == "stop" and last.completion_tokens == 2
    assert row_for(tokenizer, ignore_eos=True).suppresses_eos
    assert row_for(tokenizer, min_tokens=1).suppresses_eos


def test_a_token_outside_the_grammar_fails_the_row(tokenizer, compiler) -> None:
    row = row_for(tokenizer, compiler, grammar=GrammarSpec("json_object"))
    assert row.advance(ids(tokenizer, "x")[0], EOS) is None
    assert row.done
    assert "not allowed by the request's grammar" in str(row.take_error())


def test_without_a_grammar_the_stop_rules_are_unchanged(tokenizer) -> None:
    row = row_for(tokenizer, ignore_eos=True, max_tokens=2)
    row.advance(7, EOS)  # end-of-sequence is a token like any other
    assert not row.done and row.generated == 1
    row = row_for(tokenizer)
    assert row.advance(7, EOS).finish_reason == "stop"


def test_each_chunk_carries_the_logprobs_since_the_last_one(tokenizer) -> None:
    row = row_for(tokenizer, logprobs=2, stop=("ab",))
    a, b, c = (ids(tokenizer, t)[0] for t in "abc")
    chunks: list[GenerationChunk | None] = [row.advance(a, EOS, entry("a"))]  # held back: "ab" may begin
    chunks.append(row.advance(c, EOS, entry("c")))
    chunks.append(row.advance(b, EOS, entry("b")))
    assert chunks[0] is None
    assert chunks[1].text == "ac" and [e.token for e in chunks[1].logprobs] == ["a", "c"]
    assert chunks[2].text == "b" and chunks[2].logprobs == (entry("b"),)
    last = row.advance(7, EOS, entry("<eos>"))  # end-of-sequence: not counted, no entry
    assert last.finish_reason == "stop" and last.logprobs == () and last.completion_tokens == 3


def test_a_row_that_did_not_ask_has_no_logprobs(tokenizer) -> None:
    row = row_for(tokenizer)
    chunk = row.advance(ids(tokenizer, "a")[0], EOS, entry("a"))
    assert chunk.logprobs is None and row.logprobs == []
