"""Loading a model for an engine: the checkpoint a model YAML names, on its device, in its dtype.

`load_model` returns a `LoadedModel`: the transformers model and processor plus what every engine
derives from them (device, end-of-sequence ids, padding id, the quantization as reported). Engines
are built over a `LoadedModel` (`engine.factory.load_engine` does both steps), so one loaded model
can serve several engines in tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from engine.checkpoints import checkpoint_source
from engine.collate import collate
from engine.prompts import PreparedRequest
from engine.quant.gptq import describe, describe_quantization, load_kwargs, prepare_model
from serve_app.settings import ModelSettings

logger = logging.getLogger("ray.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # a model YAML's dtype


@dataclass
class LoadedModel:
    """A model and its processor in memory, on `device`, with what the engines read from them."""

    settings: ModelSettings
    model: torch.nn.Module
    processor: object
    device: torch.device
    eos_token_ids: frozenset[int] = field(init=False)
    pad_token_id: int = field(init=False)
    quantization: str = field(init=False)

    def __post_init__(self) -> None:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(ids)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids)
        quant = getattr(self.model.config, "quantization_config", None)
        weights = "none" if quant is None else describe_quantization(quant)
        self.quantization = describe(self.settings.quantization, weights)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def with_settings(self, **update) -> LoadedModel:
        """The same model under settings with `update` applied (e.g. other continuous-engine options)."""
        return dataclasses.replace(self, settings=self.settings.model_copy(update=update))

    def collate(self, batch: list[PreparedRequest], device: torch.device | None = None,
                pixels: bool = True) -> dict[str, torch.Tensor]:
        """`batch` as left-padded model inputs on `device` (default: the model's); see engine.collate."""
        inputs = collate(batch, self.pad_token_id, self.model.dtype, pixels)
        return {k: v.to(device or self.device) for k, v in inputs.items()}


def resolve_device(settings: ModelSettings) -> torch.device:
    """The settings' device; 'auto' is CUDA where there is one, else the CPU."""
    if settings.device != "auto":
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(settings_dtype: str | None, device: torch.device) -> torch.dtype:
    """A model YAML's dtype; 'auto' (or none) is bfloat16 on CUDA and float32 elsewhere."""
    return DTYPES.get(settings_dtype or "auto") or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load the checkpoint `settings` names (the demo one is built if missing) onto its device."""
    source = checkpoint_source(settings)
    device = resolve_device(settings)
    dtype = resolve_dtype(settings.dtype, device)
    processor = AutoProcessor.from_pretrained(source)
    if settings.load_format == "dummy":
        model = random_weights(source, dtype, device)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=dtype, **load_kwargs(source, device, settings.quantization)
        )
        prepare_model(model, source, device, settings.quantization)
    loaded = LoadedModel(settings, model.to(device).eval(), processor, device)
    logger.info("Loaded %s on %s (%s, quantization=%s%s)", source, device, dtype, loaded.quantization,
                ", random weights" if settings.load_format == "dummy" else "")
    return loaded


def random_weights(source: str, dtype: torch.dtype, device: torch.device):
    """The checkpoint's architecture with freshly initialised weights, made on `device` directly
    (a GPU builds a 10B model in seconds, where initialising it on a CPU takes minutes)."""
    config = AutoConfig.from_pretrained(source)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: the defaults derived from the config stay
        pass
    return model
