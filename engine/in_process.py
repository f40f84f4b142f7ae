"""What the two in-process engines share: what they serve is read off the model loaded beside them."""

from __future__ import annotations

from functools import cached_property

from engine.detokenizer import Detokenizer
from engine.grammar.compiler import GrammarCompiler, logits_width
from engine.loader import LoadedModel
from engine.logprobs import TokenTexts
from engine.prompts import PreparedRequest, Prompter
from engine.protocol import Engine
from serve_app.settings import ModelSettings
from serve_app.stage_types import GenerationRequest


class InProcessEngine(Engine):
    """An engine over a `LoadedModel` in this process (the engine process reads these from its child)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._prompter = Prompter(loaded.settings, loaded.processor)
        # Rows made from now on decode with this class (tests and benchmarks put a recording subclass here).
        self.detokenizer_type: type[Detokenizer] = Detokenizer

    @property
    def settings(self) -> ModelSettings:
        return self.loaded.settings

    @property
    def quantization(self) -> str:
        return self.loaded.quantization

    @property
    def device(self) -> str:
        return str(self.loaded.device)

    @property
    def prompter(self) -> Prompter:
        return self._prompter

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """As `Engine.prepare`, and the request's grammar compiled (cached): one that cannot be is the
        request's own 400 here, before it is admitted."""
        prepared = self.prompter.prepare(request)
        if request.sampling.grammar is not None:
            self.grammars.compile(request.sampling.grammar)
        return prepared

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """The model's grammar compiler, made when the first request with a grammar or logprobs comes."""
        return GrammarCompiler(self.loaded.tokenizer, logits_width(self.loaded.model), self.loaded.eos_token_ids)

    @cached_property
    def token_texts(self) -> TokenTexts:
        """Token ids as logprob entries (texts and bytes), made when the first request with logprobs comes."""
        return TokenTexts(self.loaded.tokenizer, self.grammars.token_bytes)
