"""Logprobs from a step's logits: the values against log_softmax, the top list, and token texts and bytes."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from engine.grammar.compiler import GrammarCompiler
from engine.logprobs import MAX_TOP, TokenTexts, step_logprobs

CHECKPOINT = "checkpoints/glm4v-demo-vqa"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def texts(tokenizer) -> TokenTexts:
    return TokenTexts(tokenizer, GrammarCompiler(tokenizer, len(tokenizer), {0}).token_bytes)


def test_values_are_log_softmax_and_the_top_list_is_sorted_and_as_long_as_asked(texts: TokenTexts) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1021) * 4
    tokens = torch.tensor([5, 700, 21])
    step = step_logprobs(logits, tokens, MAX_TOP)
    expected = torch.log_softmax(logits, dim=-1)
    entries = texts.entries(step, tokens.tolist(), [0, 3, MAX_TOP])
    for row, (entry, token) in enumerate(zip(entries, tokens.tolist())):
        assert entry.logprob == pytest.approx(expected[row, token].item(), abs=1e-6)
        assert entry.token == texts.text(token)
        top_values = [alt.logprob for alt in entry.top]
        assert top_values == sorted(top_values, reverse=True)
        assert top_values == pytest.approx(expected[row].topk(len(top_values)).values.tolist(), abs=1e-6)
    assert [len(e.top) for e in entries] == [0, 3, MAX_TOP]


def test_alternatives_that_could_not_be_taken_are_left_out(texts: TokenTexts) -> None:
    logits = torch.full((1, 1021), float("-inf"))
    logits[0, [30, 40]] = torch.tensor([1.0, 2.0])  # a grammar allows two tokens
    entry = texts.entries(step_logprobs(logits, torch.tensor([30]), 5), [30], [5])[0]
    assert [alt.token for alt in entry.top] == [texts.text(40), texts.text(30)]
    assert math.isclose(math.exp(entry.top[0].logprob) + math.exp(entry.top[1].logprob), 1.0, rel_tol=1e-6)
    assert entry.logprob == entry.top[1].logprob


def test_bytes_are_exact_where_a_token_is_part_of_a_character(texts: TokenTexts, tokenizer) -> None:
    ids = tokenizer.encode(" café 日本", add_special_tokens=False)
    assert b"".join(bytes(texts.bytes(i)) for i in ids).decode() == " café 日本"
    split = [i for i in ids if texts.text(i) == "\ufffd"]  # half characters decode alone as U+FFFD
    assert split and all(texts.bytes(i) != tuple("\ufffd".encode()) for i in split)
    assert texts.text(ids[0]) == tokenizer.decode([ids[0]])
