"""RowMatcher and the bitmask on the demo tokenizer: what is allowed when, and masking logits in place."""

from __future__ import annotations

import json

import pytest
import torch
from xgrammar.testing import bitmask_to_bool_mask

from engine.grammar.compiler import GrammarCompiler
from engine.grammar.matcher import allocate_bitmask, apply_bitmask, fill_bitmask
from serve_app.stage_types import GrammarSpec
from tests.engine.grammar.conftest import EOS, feed


def allowed(bitmask: torch.Tensor, row: int, vocab: int) -> set[int]:
    return set(bitmask_to_bool_mask(bitmask[row: row + 1], vocab)[0].nonzero().flatten().tolist())


def test_end_of_sequence_is_allowed_only_once_the_output_is_complete(compiler: GrammarCompiler, tokenizer) -> None:
    matcher = compiler.matcher(GrammarSpec("json_object"))
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    assert feed(matcher, tokenizer, '{"a": 1')
    fill_bitmask(bitmask, [matcher], [0])
    assert not allowed(bitmask, 0, compiler.vocab_size) & EOS
    assert feed(matcher, tokenizer, "}")
    fill_bitmask(bitmask, [matcher], [0])
    assert allowed(bitmask, 0, compiler.vocab_size) == EOS  # complete: nothing but the end
    assert not matcher.terminated
    assert matcher.accept(9) and matcher.terminated


def test_a_token_outside_the_grammar_is_refused_and_changes_nothing(compiler: GrammarCompiler, tokenizer) -> None:
    matcher = compiler.matcher(GrammarSpec("json_object"))
    assert not matcher.accept(tokenizer.convert_tokens_to_ids("a"))
    assert not matcher.accept(min(EOS))  # an empty output is no object
    assert feed(matcher, tokenizer, "{}")


def test_ids_past_the_tokenizer_are_never_allowed(compiler: GrammarCompiler, tokenizer) -> None:
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    fill_bitmask(bitmask, [compiler.matcher(GrammarSpec("json_schema", schema=json.dumps({"type": "string"})))], [0])
    within = allowed(bitmask, 0, compiler.vocab_size)
    assert within and max(within) < len(tokenizer)


def test_apply_masks_the_filled_rows_in_place_and_leaves_the_others(compiler: GrammarCompiler, tokenizer) -> None:
    vocab = compiler.vocab_size
    bitmask = allocate_bitmask(3, vocab)
    object_start, any_value = compiler.matcher(GrammarSpec("json_object")), compiler.matcher(
        GrammarSpec("json_schema", schema=json.dumps({"type": "integer"})))
    fill_bitmask(bitmask, [any_value, object_start], [2, 0])
    brace, seven = tokenizer.convert_tokens_to_ids("{"), tokenizer.convert_tokens_to_ids("7")
    assert allowed(bitmask, 0, vocab) == {brace} and seven in allowed(bitmask, 2, vocab) - {brace}
    logits = torch.randn(3, vocab)
    before = logits.clone()
    apply_bitmask(logits, bitmask, [0, 2])
    assert torch.equal(logits[1], before[1])  # unconstrained row
    for row in (0, 2):
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[list(allowed(bitmask, row, vocab))] = True
        assert torch.equal(logits[row][keep], before[row][keep])
        assert torch.isneginf(logits[row][~keep]).all()
    assert torch.isfinite(logits[0]).sum() == 1  # "{" alone
    assert logits[0].argmax().item() == tokenizer.convert_tokens_to_ids("{")


def test_apply_with_no_rows_leaves_the_logits(compiler: GrammarCompiler) -> None:
    logits = torch.randn(2, compiler.vocab_size)
    before = logits.clone()
    apply_bitmask(logits, torch.zeros(2, (compiler.vocab_size + 31) // 32, dtype=torch.int32), [])
    assert torch.equal(logits, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_apply_on_a_gpu_matches_the_cpu(compiler: GrammarCompiler) -> None:
    bitmask = allocate_bitmask(2, compiler.vocab_size)
    fill_bitmask(bitmask, [compiler.matcher(GrammarSpec("json_object"))], [1])
    logits = torch.randn(2, compiler.vocab_size)
    on_gpu = logits.cuda()
    apply_bitmask(logits, bitmask, [1])
    apply_bitmask(on_gpu, bitmask, [1])
    assert torch.equal(on_gpu.cpu(), logits)
