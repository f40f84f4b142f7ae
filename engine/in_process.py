"""What the two in-process engines share: what they serve is read off the model loaded beside them."""

from __future__ import annotations

from engine.detokenizer import Detokenizer
from engine.loader import LoadedModel
from engine.prompts import Prompter
from engine.protocol import Engine
from serve_app.settings import ModelSettings


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
