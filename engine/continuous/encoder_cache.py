"""EncoderCache: vision encoder outputs kept by image content, within a byte budget. No torch.

A multi-turn conversation sends its images again with every turn. Where the prefix cache covers an
image's tokens the image needs no features at all; where it does not (the conversation was edited
before the image, the blocks were evicted, another salt), the features come from here instead of
another pass of the vision encoder, as vLLM's encoder cache and SGLang's multimodal embedding
cache keep them. The runner keys an image by its request's cache_salt and the digest the prefix-cache
keys use (engine/prompts.py `image_digest`: pixels, dtype, shape and grid): equal digests mean
equal features, and tenants with different salts share no features (nor learn from a hit that
another sent the same image).

Entries are the encoder's tensors themselves, on the device; their bytes (`nbytes`) count against
`budget_bytes`, and the least recently used are evicted to make room (cachetools' LRUCache). One
larger than the whole budget is not kept; a budget of 0 keeps nothing.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from cachetools import LRUCache


class EncoderCache:
    """Features by key, least recently used evicted first; counts its lookups and hits."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("the encoder cache's budget cannot be negative")
        self.budget_bytes = budget_bytes
        self._entries: LRUCache = LRUCache(maxsize=max(budget_bytes, 1), getsizeof=lambda value: value.nbytes)
        self.queries = 0  # images whose features were looked up
        self.hits = 0  # of those, found here

    def get(self, key: Hashable | None) -> Any | None:
        """The features kept under `key` (now the most recently used), or None (always for None)."""
        self.queries += 1
        found = None if key is None else self._entries.get(key)
        if found is not None:
            self.hits += 1
        return found

    def put(self, key: Hashable, features: Any) -> None:
        """Keep `features` (anything with `nbytes`: a tensor that owns its storage, not a view of a larger
        one, whose bytes would stay alive uncounted) under `key`, evicting the least recently used
        entries until it fits; not kept if it alone is over the budget."""
        if features.nbytes <= self.budget_bytes:
            self._entries[key] = features

    @property
    def bytes(self) -> int:
        """Bytes of the features kept now (at most `budget_bytes`)."""
        return int(self._entries.currsize)

    def __len__(self) -> int:
        return len(self._entries)
