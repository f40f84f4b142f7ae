"""Which engine serves a model: the continuous one where it can run the model, else generate().

`ModelSettings.engine` asks for one: 'continuous' (an error if it cannot run the model), 'generate',
or 'auto', which takes the continuous engine wherever the model supports it (GLM-4V text decoders,
a KV cache unquantized or int8 (its paged cache's own format; int4 is generate()'s alone), and at
least one KV cache slot that fits the device's free memory).
"""

from __future__ import annotations

import logging

from engine.continuous.engine import ContinuousEngine
from engine.generate.engine import GenerateEngine
from engine.loader import LoadedModel, load_model
from engine.models.glm4v.decoder import unsupported_reason
from engine.protocol import Engine
from serve_app.settings import ModelSettings

logger = logging.getLogger("ray.serve")


def load_engine(settings: ModelSettings) -> Engine:
    """Load the model `settings` names and build the engine its `engine` setting asks for."""
    return choose_engine(load_model(settings))


def choose_engine(loaded: LoadedModel) -> Engine:
    """A GenerateEngine or a ContinuousEngine over `loaded`, per `loaded.settings.engine`."""
    settings = loaded.settings
    kind = settings.engine
    if kind == "generate":
        return GenerateEngine(loaded)
    reason = unsupported_reason(loaded.model, settings.quantization.kv_cache)
    if reason is None:
        try:
            return ContinuousEngine(loaded)
        except ValueError as error:  # e.g. no KV cache slot fits the free memory
            if kind == "continuous":
                raise
            reason = str(error)
    if kind == "continuous":
        raise ValueError(f"engine: continuous is not available for {settings.id}: {reason}")
    logger.info("Using the generate() engine for %s: %s", settings.id, reason)
    return GenerateEngine(loaded)
