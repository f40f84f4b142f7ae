"""The application's own metrics, exported through Ray's metrics API (Prometheus, with a `ray_` prefix).

One small class per deployment creates its instruments in the replica's constructor; Ray adds the
deployment, replica and application tags itself.
"""

from __future__ import annotations

from ray.serve import metrics

from serve_app.stage_types import CacheStats

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_BYTES = [1e3, 1e4, 1e5, 5e5, 1e6, 2e6, 5e6, 1e7]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "vlm_requests", "HTTP requests by route and status code.", tag_keys=("route", "status")
        )
        self.prompt_tokens = metrics.Counter("vlm_prompt_tokens", "Prompt tokens served, image tokens included.")
        self.completion_tokens = metrics.Counter("vlm_completion_tokens", "Completion tokens generated.")
        self.ttft = metrics.Histogram(
            "vlm_time_to_first_token_s", "Seconds from request arrival to its first token.", boundaries=_LATENCY_S
        )
        self.inter_token = metrics.Histogram(
            "vlm_inter_token_latency_s", "Seconds between consecutive streamed chunks.", boundaries=_LATENCY_S
        )
        self.rate_limited = metrics.Counter("vlm_rate_limit_refusals", "Requests refused by a rate limit.")


class VLMMetrics:
    def __init__(self) -> None:
        self.batch_size = metrics.Histogram(
            "vlm_batch_size", "Requests per engine batch.", boundaries=_BATCH_SIZES
        )
        self.queue_depth = metrics.Gauge(
            "vlm_queue_depth", "Requests received by the replica and not yet finished."
        )
        self.cancelled = metrics.Counter(
            "vlm_cancelled_requests", "Requests dropped from a running batch because their client went away."
        )
        self.prefix_queries = metrics.Counter(
            "vlm_prefix_cache_queries", "Prompt tokens looked up in the engine's prefix cache (at each admission)."
        )
        self.prefix_hits = metrics.Counter(
            "vlm_prefix_cache_hits", "Prompt tokens found in the prefix cache: their KV blocks were not computed again."
        )
        self.encoder_queries = metrics.Counter(
            "vlm_encoder_cache_queries", "Images whose vision features were looked up in the encoder cache."
        )
        self.encoder_hits = metrics.Counter(
            "vlm_encoder_cache_hits", "Images whose vision features came from the encoder cache (no encoder pass)."
        )
        self.encoder_bytes = metrics.Gauge("vlm_encoder_cache_bytes", "Bytes the encoder cache holds now.")
        self._cache_stats = CacheStats()

    def export_cache_stats(self, stats: CacheStats) -> None:
        """Move the cache counters on to the engine's figures (cumulative: each counter gets what is new)."""
        last, self._cache_stats = self._cache_stats, stats
        for counter, now, before in (
            (self.prefix_queries, stats.prefix_queried_tokens, last.prefix_queried_tokens),
            (self.prefix_hits, stats.prefix_hit_tokens, last.prefix_hit_tokens),
            (self.encoder_queries, stats.encoder_queried_images, last.encoder_queried_images),
            (self.encoder_hits, stats.encoder_hit_images, last.encoder_hit_images),
        ):
            if now > before:
                counter.inc(now - before)
        self.encoder_bytes.set(stats.encoder_cache_bytes)


class PreprocessMetrics:
    def __init__(self) -> None:
        self.fetch_bytes = metrics.Histogram(
            "vlm_image_fetch_bytes", "Size of fetched or decoded image payloads.", boundaries=_BYTES
        )
        self.fetch_latency = metrics.Histogram(
            "vlm_image_fetch_latency_s", "Seconds to fetch (or decode a data URL of) one image.", boundaries=_LATENCY_S
        )
        self.images = metrics.Counter("vlm_images", "Images preprocessed, by outcome.", tag_keys=("outcome",))
        self.cache = metrics.Counter(
            "vlm_image_cache_lookups", "Preprocessed-image cache lookups by result (hit or miss).", tag_keys=("result",)
        )


_ROUTES = ("/v1/chat/completions", "/v1/models", "/health")


class CountRequests:
    """ASGI middleware counting requests by route and status; unknown paths share one label."""

    def __init__(self, app, counter: metrics.Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = next((r for r in _ROUTES if path == r or path.startswith(r + "/")), "/" if path == "/" else "other")
        status = 500

        async def recording_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.counter.inc(tags={"route": route, "status": str(status)})
