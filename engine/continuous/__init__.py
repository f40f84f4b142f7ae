"""The continuous-batching engine (issue 7) and the choice between it and the generate() engine.

- `engine.ContinuousEngine`: the engine thread, slots, admission, streaming;
- `decoder.Glm4vDecoder`: prefill and the decode step, both on the HF model's modules and straight
  into the slot cache;
- `vision`: the vision encoder's attention as one FlashAttention call per block (on a GPU);
- `slots`: the preallocated KV cache and per-slot device state;
- `sampling`: greedy / temperature / top_p / seeded sampling of all rows at once, on the device;
- `graphs.StepRunner`: eager, torch.compile'd or CUDA-graph replay of the decode step.
"""

from __future__ import annotations

import logging

from engine.continuous.engine import ContinuousEngine
from engine.generate.engine import Engine
from engine.models.glm4v.decoder import unsupported_reason
from serve_app.settings import ModelSettings

logger = logging.getLogger("ray.serve")

__all__ = ["ContinuousEngine", "choose_engine", "load_engine", "unsupported_reason"]


def load_engine(settings: ModelSettings) -> Engine:
    """Load the model `settings` names and wrap it in the engine its `engine` setting asks for."""
    return choose_engine(Engine.load(settings))


def choose_engine(engine: Engine) -> Engine:
    """`engine` itself (generate()) or a ContinuousEngine over its model, per `settings.engine`:
    'auto' takes the continuous engine wherever the model supports it."""
    kind = engine.settings.engine
    if kind == "generate":
        return engine
    reason = unsupported_reason(engine.model, engine.settings.quantization.kv_cache)
    if reason is None:
        try:
            return ContinuousEngine.from_engine(engine)
        except ValueError as error:  # e.g. no KV cache slot fits the free memory
            if kind == "continuous":
                raise
            reason = str(error)
    if kind == "continuous":
        raise ValueError(f"engine: continuous is not available for {engine.settings.id}: {reason}")
    logger.info("Using the generate() engine for %s: %s", engine.settings.id, reason)
    return engine
