"""The application builder: `import_path: deployments.app:build_app` in serve_config.yaml.

Ray Serve validates the config's `args` into `AppArgs` before calling it (a typed builder), and
each deployment is bound with only the settings it needs.
"""

# No `from __future__ import annotations` here: Serve reads the real AppArgs annotation.
import logging

from ray.serve import Application

from deployments import options
from deployments.ingress import Ingress
from deployments.preprocess import ImagePreprocessor
from deployments.ratelimit import RateLimiter
from deployments.vlm import VLMServer
from serve_app.settings import AppArgs

logger = logging.getLogger("ray.serve")


def build_app(args: AppArgs) -> Application:
    model = args.model_settings()
    preprocessor = ImagePreprocessor.options(**options.IMAGE_PREPROCESSOR).bind(args.images, model)
    vlm = VLMServer.options(
        **options.VLM_SERVER, **options.vlm_request_router(args.routing), user_config=args.batching.model_dump()
    ).bind(model)
    # The shared budget store only exists when there is a budget to keep.
    limiter = RateLimiter.options(**options.RATE_LIMITER).bind() if args.ingress.rate_limited else None
    return Ingress.options(**options.INGRESS).bind(args.ingress, model, preprocessor, vlm, limiter,
                                                   keyed_routing=args.routing.router != "default")
