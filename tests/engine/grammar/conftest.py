"""The demo checkpoint's real tokenizer and a grammar compiler over it (no model weights needed)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.grammar.compiler import GrammarCompiler
from engine.grammar.matcher import RowMatcher
from serve_app.stage_types import GrammarSpec

CHECKPOINT = "checkpoints/glm4v-demo-vqa"
EOS = frozenset({0, 7, 9})  # the demo model's generation_config.json
PADDED_VOCAB = 1030  # wider than the tokenizer's 1021, as a model's logits may be


@pytest.fixture(scope="package")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="package")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, PADDED_VOCAB, EOS)


def feed(matcher: RowMatcher, tokenizer, text: str) -> bool:
    """Whether `matcher` accepts `text`'s tokens one by one."""
    return all(matcher.accept(token) for token in tokenizer.encode(text, add_special_tokens=False))


def accepts(compiler: GrammarCompiler, tokenizer, spec: GrammarSpec, text: str) -> bool:
    """Whether `spec`'s grammar takes `text` as a whole output: its tokens, then end-of-sequence."""
    matcher = compiler.matcher(spec)
    return feed(matcher, tokenizer, text) and matcher.accept(min(EOS)) and matcher.terminated
