"""Constrained decoding: what a `GrammarSpec` allows, as a token mask per row and step (xgrammar).

- `errors.GrammarError`: a spec that cannot be enforced (an OpenAI 400 naming the parameter);
- `specs`: the spec's JSON read and checked in plain Python (no torch: the ingress may call
  `specs.check` to refuse a bad schema before it reaches a model replica);
- `tool_call`: the grammar of one tool call in GLM-4.5V/4.6V's markup;
- `compiler.GrammarCompiler`: one per loaded model; compiles specs (cached) into `RowMatcher`s;
- `matcher`: `RowMatcher` (one row's grammar state), `allocate_bitmask`, `fill_bitmask`, `apply_bitmask`.

This package's `__init__` imports nothing, so `engine.grammar.errors` and `engine.grammar.specs`
load without xgrammar or torch.
"""
