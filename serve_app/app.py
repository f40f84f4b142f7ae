"""The application builder: `import_path: serve_app.app:build_app` in serve_config.yaml.

Ray Serve validates the config's `args` into `AppArgs` before calling it (a typed builder), and
each deployment is bound with only the settings it needs.
"""

# No `from __future__ import annotations` here: Serve reads the real AppArgs annotation.
import logging

from ray.serve import Application

from deployments.ingress import Ingress
from deployments.preprocess import ImagePreprocessor
from deployments.ratelimit import RateLimiter
from deployments.vlm import VLMServer
from serve_app.settings import AppArgs

logger = logging.getLogger("ray.serve")


def build_app(args: AppArgs) -> Application:
    model = args.model_settings()
    preprocessor = ImagePreprocessor.bind(args.images, model)
    vlm = VLMServer.options(user_config=args.batching.model_dump()).bind(model)
    # The shared budget store only exists when there is a budget to keep.
    limiter = RateLimiter.bind() if args.ingress.rate_limited else None
    return Ingress.bind(args.ingress, model, preprocessor, vlm, limiter)
