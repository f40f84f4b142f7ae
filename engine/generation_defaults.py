"""The sampling defaults a model is served with: its generation_config.json, then its YAML's overrides.

As vLLM's `--generation-config auto`: the values a checkpoint's generation_config.json sets are used
for the fields a request leaves out, and the model YAML's `generation_defaults:` overrides them one by
one. `do_sample: false` in the file means greedy decoding (temperature 0), as transformers' generate()
reads it.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from transformers import GenerationConfig

from engine.checkpoints import checkpoint_source
from serve_app.settings import GenerationDefaults, ModelSettings

logger = logging.getLogger("ray.serve")

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def stated_values(config: GenerationConfig) -> dict[str, float | int]:
    """The sampling values `config` sets: only what its file states, not transformers' own defaults."""
    stated = config.to_diff_dict()
    values = {name: stated[name] for name in _SAMPLING_FIELDS if stated.get(name) is not None}
    if stated.get("do_sample") is False:
        values["temperature"] = 0.0
    return values


def read_generation_config(settings: ModelSettings) -> dict[str, float | int]:
    """The checkpoint's values (none when it has no generation_config.json, or `generation_config: none`)."""
    if settings.generation_config == "none":
        return {}
    try:
        config = GenerationConfig.from_pretrained(checkpoint_source(settings))
    except OSError:  # no generation_config.json: nothing is set
        return {}
    return stated_values(config)


def resolve_generation_defaults(settings: ModelSettings) -> GenerationDefaults:
    """What fills the sampling fields a request leaves out, for the model `settings` serves."""
    checkpoint = read_generation_config(settings)
    merged = {**checkpoint, **settings.generation_defaults.model_dump(exclude_none=True)}
    try:
        defaults = GenerationDefaults.model_validate(merged)
    except ValidationError as exc:
        raise ValueError(
            f"{checkpoint_source(settings)}'s generation_config.json sets sampling values this server refuses "
            f"({checkpoint}); override them in the model YAML's generation_defaults, or set "
            f"`generation_config: none`:\n{exc}"
        ) from None
    logger.info("Generation defaults for %s: %s", settings.id, defaults.model_dump(exclude_none=True) or "OpenAI's")
    return defaults
