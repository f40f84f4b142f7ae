"""ImagePreprocessor: image reference in, model-ready tensors out, on CPU replicas.

Fetching and decoding images is CPU and network work; keeping it here leaves the model replicas
free to spend their time on the model.
"""

from __future__ import annotations

import asyncio

from ray import serve
from transformers import AutoImageProcessor

from deployments.image_decode import decode_image
from deployments.image_fetch import load_image_bytes, make_client
from serve_app.checkpoints import ensure_checkpoint
from serve_app.errors import ImageError
from serve_app.settings import ImageSettings, ModelSettings
from serve_app.stage_types import ImageInput, PreprocessedImage


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4},
    max_ongoing_requests=16,
)
class ImagePreprocessor:
    def __init__(self, image_settings: ImageSettings, model_settings: ModelSettings) -> None:
        self._settings = image_settings
        self._processor = AutoImageProcessor.from_pretrained(ensure_checkpoint(model_settings))
        self._client = make_client(image_settings)

    async def process(self, image: ImageInput) -> PreprocessedImage:
        data = await load_image_bytes(image.url, self._settings, self._client, image.param)
        # Decoding and the model's processor are CPU-bound: keep the event loop free for fetches.
        return await asyncio.to_thread(self._to_tensors, data, image.param)

    def _to_tensors(self, data: bytes, param: str) -> PreprocessedImage:
        picture = decode_image(data, self._settings, param)
        try:
            features = self._processor(images=[picture], return_tensors="pt")
        except ValueError as exc:
            raise ImageError(f"The model's image processor refused the image: {exc}", param) from None
        t, h, w = (int(v) for v in features["image_grid_thw"][0])
        return PreprocessedImage(
            pixel_values=features["pixel_values"], grid_thw=(t, h, w), width=picture.width, height=picture.height
        )

    async def check_health(self) -> None:
        if self._client.is_closed:
            raise RuntimeError("the image fetch client is closed")
