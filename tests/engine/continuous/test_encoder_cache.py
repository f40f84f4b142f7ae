"""The encoder cache alone: a byte budget that holds under a stream of changing images, least
recently used evicted first, and its lookup counts."""

from __future__ import annotations

import random

import numpy as np

from engine.continuous.encoder_cache import EncoderCache


def features(tokens: int) -> np.ndarray:
    return np.zeros((tokens, 16), dtype=np.float32)  # 64 bytes a token


def test_a_stream_of_changing_images_stays_within_the_budget() -> None:
    rng = random.Random(3)
    budget = 64 * 1000
    cache = EncoderCache(budget)
    kept: dict[str, np.ndarray] = {}
    for i in range(2000):
        digest = f"image-{rng.randrange(60)}" if rng.random() < 0.5 else f"new-{i}"
        found = cache.get(digest)
        if found is None:
            made = features(rng.randrange(1, 400))
            cache.put(digest, made)
            kept[digest] = made
        else:
            assert found is kept[digest]  # what was put, not a copy
        assert cache.bytes <= budget
    assert 0 < cache.hits < cache.queries == 2000
    assert len(cache) > 1 and cache.bytes == sum(kept[d].nbytes for d in kept if cache.get(d) is not None)


def test_least_recently_used_goes_first_and_an_image_over_the_budget_is_not_kept() -> None:
    cache = EncoderCache(64 * 30)
    for name in "abc":
        cache.put(name, features(10))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", features(10))
    assert cache.get("b") is None and all(cache.get(n) is not None for n in "acd")
    cache.put("huge", features(31))
    assert cache.get("huge") is None and len(cache) == 3
    assert cache.get(None) is None  # an image without a digest is never found


def test_a_zero_budget_keeps_nothing_but_still_counts() -> None:
    cache = EncoderCache(0)
    cache.put("a", features(1))
    assert cache.get("a") is None and (cache.queries, cache.hits, cache.bytes) == (1, 0, 0)
