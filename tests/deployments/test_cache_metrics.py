"""The model stage's cache metrics: the engine's cumulative figures become counter increments (only
what is new since the last export) and the encoder cache's size a gauge. Without Ray running, its
metric objects record nothing; the increments are read where the counters are given them."""

from __future__ import annotations

import pytest

from deployments.metrics import VLMMetrics
from serve_app.stage_types import CacheStats


def test_each_export_adds_what_is_new(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = VLMMetrics()
    given: list[tuple[str, float]] = []
    for name in ("prefix_queries", "prefix_hits", "encoder_queries", "encoder_hits"):
        monkeypatch.setattr(getattr(metrics, name), "inc", lambda value, name=name: given.append((name, value)))
    monkeypatch.setattr(metrics.encoder_bytes, "set", lambda value: given.append(("encoder_bytes", value)))
    metrics.export_cache_stats(CacheStats(100, 40, 3, 1, 2048))
    metrics.export_cache_stats(CacheStats(100, 40, 3, 1, 2048))  # nothing new: no increment
    metrics.export_cache_stats(CacheStats(150, 72, 4, 1, 1024))
    assert given == [("prefix_queries", 100), ("prefix_hits", 40), ("encoder_queries", 3), ("encoder_hits", 1),
                     ("encoder_bytes", 2048), ("encoder_bytes", 2048),
                     ("prefix_queries", 50), ("prefix_hits", 32), ("encoder_queries", 1), ("encoder_bytes", 1024)]
