"""GrammarCompiler: a loaded model's grammars, compiled once per spec and cached.

Built once per loaded model, from its tokenizer, the width of its logits (the lm_head's
`out_features`, which may exceed the tokenizer's length: the extra ids are never allowed) and its
end-of-sequence ids: xgrammar allows those where the grammar may end, and only those once it is
complete.

What each kind of `GrammarSpec` compiles to:
- json_object: any JSON object (a JSON schema `{"type": "object"}` with other properties allowed);
- json_schema: the schema with xgrammar's strict mode (no properties or items beyond those the
  schema names, as OpenAI's strict structured outputs; required properties in declared order);
- tool_call: one call in GLM's tool-call markup (engine/grammar/tool_call.py).
JSON is written compactly (no whitespace between tokens but the single space after `:` and `,`):
a model, small ones above all, cannot loop on whitespace, and the layout is the one models
usually write.
"""

from __future__ import annotations

import json
import threading

import xgrammar as xgr
from cachetools import LRUCache, cachedmethod

from engine.grammar import specs
from engine.grammar.errors import GrammarError
from engine.grammar.matcher import RowMatcher
from engine.grammar.tool_call import tool_call_tag
from serve_app.stage_types import GrammarSpec

# Compiled grammars kept, by their size: for a 150k vocabulary a JSON schema's is typically 1-10 MB.
CACHE_BYTES = 512 * 2**20


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer and vocabulary into `RowMatcher`s."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int] | set[int]) -> None:
        """`vocab_size`: the model's logits width; `stop_token_ids`: its end-of-sequence ids."""
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        # Cached here, by spec and by size; xgrammar's own cache (by text, unbounded) is off.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, cache_enabled=False)
        self._cache: LRUCache = LRUCache(CACHE_BYTES, getsizeof=lambda compiled: compiled.memory_size_bytes)
        self._lock = threading.Lock()

    @property
    def token_bytes(self) -> list[bytes]:
        """Each token id's exact bytes (a byte-level token may be part of a UTF-8 character)."""
        return self.tokenizer_info.decoded_vocab

    @cachedmethod(lambda self: self._cache, lock=lambda self: self._lock)
    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """`spec` compiled (cached by spec). Raises `GrammarError` naming what cannot be enforced."""
        specs.check(spec)
        try:
            if spec.kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                          strict_mode=False)
            if spec.kind == "json_schema":
                return self._compiler.compile_json_schema(spec.schema, any_whitespace=False, strict_mode=True)
            return self._compiler.compile_structural_tag(json.dumps(tool_call_tag(specs.tools(spec))))
        except (RuntimeError, ValueError) as error:  # xgrammar's messages name the problem
            raise GrammarError(f"{_what(spec)} cannot be compiled into a grammar: {_reason(error)}",
                               param=specs.param_of(spec)) from None

    def matcher(self, spec: GrammarSpec) -> RowMatcher:
        """A new row's matcher for `spec`, at the start of its output."""
        return RowMatcher(self.compile(spec))


def logits_width(model) -> int:
    """The width of a transformers model's logits: its output embedding's, which may exceed the tokenizer's
    length (the vocabulary padded to a multiple of some number)."""
    return model.get_output_embeddings().out_features


def _what(spec: GrammarSpec) -> str:
    return {"json_object": "response_format", "json_schema": "response_format.json_schema.schema",
            "tool_call": "tools"}[spec.kind]


def _reason(error: Exception) -> str:
    """xgrammar's message without its C++ source location ("[time] file.cc:123: ...")."""
    line = next((line for line in str(error).splitlines() if line.strip()), str(error))
    return line.split(": ", 1)[1] if line.startswith("[") and ": " in line else line
