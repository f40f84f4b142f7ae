"""Every deployment's default options, in one place.

The builder applies these with `.options(**...)`; a Serve config's `deployments:` entry overrides any
of them. Only resources and concurrency are set here: replica counts and autoscaling are the
operator's, set in the config, so a config never has to undo a default (a code-level
`autoscaling_config` would survive a config's `num_replicas`).
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import RequestRouterConfig

from serve_app.settings import RoutingSettings

INGRESS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0},  # waits on the network and on the other stages
    "max_ongoing_requests": 256,
}
IMAGE_PREPROCESSOR: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 1},  # decoding and resizing are CPU-bound
    "max_ongoing_requests": 16,
}
VLM_SERVER: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 1},
    "max_ongoing_requests": 64,  # at least the largest batch, or batches never fill
}
RATE_LIMITER: dict[str, Any] = {
    "num_replicas": 1,  # the one shared budget store: more replicas would split the budgets
    "ray_actor_options": {"num_cpus": 0},
    "max_ongoing_requests": 1000,
}


def vlm_request_router(routing: RoutingSettings) -> dict[str, Any]:
    """The VLMServer's router options: none for Ray's default router (a config's own
    `request_router_config` then applies as written), the prefix-affinity router otherwise."""
    if routing.router == "default":
        return {}
    config = RequestRouterConfig(
        request_router_class="deployments.affinity_router.PrefixAffinityRouter",
        request_router_kwargs={"bound": routing.affinity_queue_bound},
    )
    return {"request_router_config": config}
