"""Prefix-affinity routing for the VLMServer: a conversation's turns go to the replica that holds its cache.

The continuous engine keeps a conversation's KV blocks (and its images' encoder outputs) after each turn,
so the next turn prefills only what is new, but only on the replica that served the earlier turn. The
ingress keys each request on its conversation's first turn (`conversation_key`, carried as
`GenerationRequest.routing_key`); this module's Ray Serve request router sends equal keys to one replica.

Two parts:
- the choice (`ReplicaLoad`, `rendezvous_order`, `choose`): pure, no Ray, unit-tested on its own;
- `PrefixAffinityRouter`: Ray Serve's `RequestRouter` around it, selected through the VLMServer's
  `request_router_config` (deployments/options.py, `routing.router: prefix_affinity` in the config).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serve_app.stage_types import ImageInput, ImagePart, PromptMessage, TextPart

# ---- the routing key ------------------------------------------------------------------------------


def conversation_key(messages: Sequence[PromptMessage], images: Sequence[ImageInput],
                     cache_salt: str | None = None) -> str | None:
    """A hex digest of the conversation's first turn: every message up to and including the first user
    message (the system prompt before it too), their texts and their images, and the cache salt (salted
    requests share no cache with others). Later turns leave it unchanged, so every turn of a conversation
    gets the key of its first. None when there is no user message.

    An image counts by its URL: for a `data:` URL that is its content (base64); for a remote URL, the
    address stands for what it serves. The ingress does not have the bytes of a remote image: the
    preprocessor fetches them while the request is already being routed.
    """
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
    if first_user is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"salt\0" + (cache_salt or "").encode() + b"\0")
    next_image = 0
    for message in messages[: first_user + 1]:
        digest.update(b"role\0" + message.role.encode() + b"\0")
        for part in message.parts:
            if isinstance(part, TextPart):
                digest.update(b"text\0" + str(len(part.text)).encode() + b"\0" + part.text.encode())
            elif isinstance(part, ImagePart):
                url = images[next_image].url.encode() if next_image < len(images) else b""
                next_image += 1
                digest.update(b"image\0" + str(len(url)).encode() + b"\0" + url)
    return digest.hexdigest()


# ---- the choice (no Ray) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaLoad:
    """A candidate replica and the requests it has in flight, as last known (None: not known lately)."""

    replica_id: str
    queue_len: int | None = None


def _weight(key: str, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """The replicas in the key's order of preference: highest-random-weight (rendezvous) hashing.

    Each (key, replica) pair has a fixed pseudo-random weight; a key prefers its heaviest replica. A new
    replica takes over only the keys it outweighs everyone on (its fair share), and a removed replica's
    keys move to their second choice: every other key stays where its cache is.
    """
    return sorted(replica_ids, key=lambda r: (_weight(key, r), r), reverse=True)


def choose(key: str | None, candidates: Sequence[ReplicaLoad], bound: int) -> str:
    """The replica for a request of routing key `key` among `candidates` (not empty).

    - With a key: its rendezvous replica, unless that one's known queue is longer than `bound`; then the
      least loaded of the others, ties going to the key's next preference (so an overflowing conversation
      also keeps to one replica while the load lasts).
    - Without a key: the least loaded replica, ties broken at random.

    A replica whose load is not known counts as idle, as Ray's own router treats it (it probes before
    sending).
    """
    if not candidates:
        raise ValueError("no candidate replicas")
    load = {c.replica_id: c.queue_len or 0 for c in candidates}
    if key is None:
        least = min(load.values())
        return random.choice([r for r, n in load.items() if n == least])
    home, *others = rendezvous_order(key, list(load))
    if load[home] <= bound or not others:
        return home
    return min(others, key=lambda r: load[r])  # min keeps the first of equals: the preference order


# ---- Ray Serve's request router ---------------------------------------------------------------------


def _routing_key(request: PendingRequest | None) -> str | None:
    """The key a handle call carries: `routing_key` of its first argument (a GenerationRequest); None for
    calls without one (model_info, health)."""
    if request is None or not request.args:
        return None
    key = getattr(request.args[0], "routing_key", None)
    return key if isinstance(key, str) else None


class PrefixAffinityRouter(RequestRouter):
    """`request_router_config: {request_router_class: deployments.affinity_router.PrefixAffinityRouter,
    request_router_kwargs: {bound: N}}`.

    `choose_replicas` returns two ranks: the replica `choose` picks from the handle's cached queue
    lengths, then every other replica. Ray probes the first rank's queue before sending and moves to the
    second (its least loaded replica) when that one is full (max_ongoing_requests). Requests are matched
    to replicas exactly, not first-in first-out (no FIFOMixin), so a replica chosen for one conversation
    is never handed to another waiting request.
    """

    def initialize_state(self, bound: int = 32) -> None:
        """Called by Serve with `request_router_kwargs`."""
        self._bound = bound

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [ReplicaLoad(rid, self.replica_queue_len_cache.get(r.replica_id)) for rid, r in by_id.items()]
        chosen = by_id[choose(_routing_key(pending_request), loads, self._bound)]
        rest = [r for r in candidate_replicas if r is not chosen]
        return [[chosen], rest] if rest else [[chosen]]
