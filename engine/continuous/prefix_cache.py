"""Prefix-cache keys of KV blocks: a hash chain over token ids, image content and a tenant salt. No torch.

A full block of a sequence is named by a key that stands for everything the keys and values in it
depend on: every token before it and in it, what each image among those tokens shows, and whose
request it was. As vLLM v1 keys its prefix cache (`hash_block_tokens`):

    key(block i) = sha256(key(block i - 1) | token ids of block i | extra keys of block i)

- block 0 has no parent; its extra keys start with the request's `cache_salt` (None by default),
  so requests with different salts never share a block, and a key chain can only meet another
  that began with the same salt;
- image placeholder tokens are the same ids whatever the picture: each image whose tokens overlap
  the block adds its token span and its content digest (engine/prompts.py `image_digest`: its
  preprocessed pixels, their dtype and shape, and its patch grid, i.e. the image and the resolution
  it was processed at). The same text with another picture so never matches past the image's first
  block.

Keys are sha256 digests over length-prefixed fields (never Python's `hash`, which is salted per
process and 64-bit). Equal keys mean equal keys and values in the block for every model input the
continuous engine feeds GLM-4V (token ids, image features, mrope positions, which follow from
the tokens and the grids).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

Key = bytes


@dataclass(frozen=True)
class ImageSpan:
    """Token positions start..end-1 of a prompt hold the placeholders of the image with `digest`."""

    start: int
    end: int
    digest: str


@dataclass(frozen=True)
class PrefixCaching:
    """How a request's image placeholders are found: the placeholder token, and how many patches of an
    image's grid merge into one token (GLM-4V: spatial_merge_size ** 2)."""

    image_token_id: int
    merge_units: int

    def spans(self, request) -> list[ImageSpan] | None:
        """Where each image of `request` (a PreparedRequest: input_ids, image_grid_thw, image_hashes)
        lies in its prompt: image i takes the next prod(grid_i) / merge_units placeholder positions, in
        order. None when its blocks cannot be keyed: an image without a digest, or placeholders that do
        not add up to the grids (the prefill refuses such a prompt anyway)."""
        grids = list(request.image_grid_thw)
        digests = list(getattr(request, "image_hashes", ()))
        if len(digests) != len(grids):
            return None
        positions = [i for i, token in enumerate(request.input_ids) if token == self.image_token_id]
        counts = [grid[0] * grid[1] * grid[2] // self.merge_units for grid in grids]
        if sum(counts) != len(positions):
            return None
        if 0 in counts:
            return None
        spans, taken = [], 0
        for count, digest in zip(counts, digests):
            spans.append(ImageSpan(positions[taken], positions[taken + count - 1] + 1, digest))
            taken += count
        return spans


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def block_key(parent: Key | None, tokens: Sequence[int], start: int, spans: Sequence[ImageSpan],
              salt: str | None) -> Key:
    """The key of the full block holding `tokens` at positions start.. of its sequence, after the
    block keyed `parent` (None: the first block, which carries `salt`)."""
    digest = hashlib.sha256()
    if parent is None:
        digest.update(b"\x00" if salt is None else b"\x01" + _field(salt.encode()))
    else:
        digest.update(parent)
    digest.update(_field(array("q", tokens).tobytes()))
    end = start + len(tokens)
    for span in spans:
        if span.start < end and span.end > start:
            digest.update(_field(f"{span.start}:{span.end}:{span.digest}".encode()))
    return digest.digest()


def chain_keys(tokens: Sequence[int], block_size: int, spans: Sequence[ImageSpan], salt: str | None,
               known: Sequence[Key] = ()) -> list[Key]:
    """The keys of every full block of `tokens`, the first len(known) of them already `known`."""
    keys = list(known)
    for index in range(len(keys), len(tokens) // block_size):
        start = index * block_size
        keys.append(block_key(keys[-1] if keys else None, tokens[start:start + block_size], start, spans, salt))
    return keys
