"""ImagePreprocessor: image reference in, model-ready tensors out, on CPU replicas.

Fetching and decoding images is CPU and network work; keeping it here leaves the model replicas
free to spend their time on the model. Each image is resized to the pixel budget its request asks
for (`image_url.detail`, or the `min_pixels`/`max_pixels` extension, within the operator's limits),
and results are kept by content hash, so an image seen again is not decoded or processed again.

Decoding memory is bounded per image (the header is checked, and JPEGs decode at the scale the
budget keeps, before any pixel is decoded) and per replica: images decode in threads only while
their pixels fit in the replica's `DecodeBudget`, later ones wait their turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from dataclasses import dataclass

from cachetools import LRUCache
from PIL import Image
from ray import serve

from deployments.metrics import PreprocessMetrics
from engine.checkpoints import checkpoint_source
from engine.images.budget import DecodeBudget
from engine.images.decode import OpenedImage, decode_opened, open_image
from engine.images.fetch import load_image_bytes, make_client
from serve_app.errors import ImageError, InvalidRequestError
from serve_app.settings import ImageSettings, ModelSettings
from serve_app.stage_types import ImageInput, PreprocessedImage


@dataclass(frozen=True)
class PixelBudget:
    min_pixels: int
    max_pixels: int


class Resolutions:
    """The pixel budget of each `detail` level, bounded by the model processor and the operator."""

    def __init__(self, processor, settings: ImageSettings) -> None:
        # GLM's processors count an image's pixels over its two temporal copies.
        self._factor = getattr(processor, "temporal_patch_size", 1) if type(processor).__name__.startswith("Glm") else 1
        size = processor.size
        native_min = (size.get("shortest_edge") if isinstance(size, dict) else size.shortest_edge) // self._factor
        native_max = (size.get("longest_edge") if isinstance(size, dict) else size.longest_edge) // self._factor
        self.floor = native_min
        self.high = min(native_max, settings.max_pixels or native_max)
        self.low = max(self.floor, min(settings.detail_low_max_pixels, self.high))
        self.auto = max(self.floor, min(settings.detail_auto_max_pixels or self.high, self.high))

    def budget(self, image: ImageInput) -> PixelBudget:
        if image.min_pixels is None and image.max_pixels is None:
            top = {"low": self.low, "high": self.high}.get(image.detail, self.auto)
            return PixelBudget(self.floor, top)
        low, high = image.min_pixels or self.floor, image.max_pixels or self.high
        for name, value in (("min_pixels", low), ("max_pixels", high)):
            if not self.floor <= value <= self.high:
                raise InvalidRequestError(
                    f"image_url.{name} must be between {self.floor} and {self.high} pixels on this server.",
                    param=f"{image.param}.image_url.{name}",
                    code="invalid_value",
                )
        return PixelBudget(low, high)

    def processor_size(self, budget: PixelBudget) -> dict[str, int]:
        return {"shortest_edge": budget.min_pixels * self._factor, "longest_edge": budget.max_pixels * self._factor}


@serve.deployment
class ImagePreprocessor:
    def __init__(self, image_settings: ImageSettings, model_settings: ModelSettings) -> None:
        # Imported here, not at the top: transformers and torch take seconds to import, and building the
        # application (`serve run`, `serve deploy`) imports this module without processing an image.
        from transformers import AutoImageProcessor

        from engine.loader import DTYPES

        self._settings = image_settings
        self._processor = AutoImageProcessor.from_pretrained(checkpoint_source(model_settings))
        self._merge = getattr(self._processor, "merge_size", 1) ** 2
        self._resolutions = Resolutions(self._processor, image_settings)
        # Pixels leave in the model's dtype where the YAML names one: the model casts them to it first
        # thing anyway, and bf16 halves the bytes each image costs over two Ray hops (4.8 MB in float32
        # for 448x448) and in the cache. "auto" keeps float32: the device, hence the dtype, is not known here.
        self._dtype = DTYPES.get(model_settings.dtype, DTYPES["float32"])
        self._client = make_client(image_settings)
        self._decoding = DecodeBudget(image_settings.decode_pixel_budget)
        self._metrics = PreprocessMetrics()
        # Bounded by the tensors' bytes, least recently used first out.
        self._cache: LRUCache = LRUCache(
            maxsize=max(1, image_settings.cache_bytes), getsizeof=lambda image: image.pixel_values.nbytes
        )
        self._warm_up()

    def _warm_up(self) -> None:
        """Decode and process one small image before the first request: the first call in a fresh
        process cost the requests that met it ~40 ms more than later ones on the GPU machine (lazy
        imports and first-use setup in Pillow and the processor), on every new replica."""
        png = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 128, 128)).save(png, format="PNG")
        budget = PixelBudget(self._resolutions.floor, self._resolutions.auto)
        self._to_tensors(open_image(png.getvalue(), self._settings, "warm-up", budget.max_pixels), "warm-up", budget)

    async def process(self, image: ImageInput) -> PreprocessedImage:
        started = time.perf_counter()
        try:
            budget = self._resolutions.budget(image)
            data = await load_image_bytes(image.url, self._settings, self._client, image.param)
            self._metrics.fetch_latency.observe(time.perf_counter() - started)
            self._metrics.fetch_bytes.observe(len(data))
            key = (hashlib.sha256(data).digest(), budget)
            cached = self._cache.get(key)
            self._metrics.cache.inc(tags={"result": "hit" if cached is not None else "miss"})
            if cached is not None:
                result = cached
            else:
                # Reading the header, decoding and the model's processor are CPU-bound: they run in
                # threads, to keep the event loop free for fetches; decoding waits for its pixels' turn.
                opened = await asyncio.to_thread(open_image, data, self._settings, image.param, budget.max_pixels)
                result = await self._decoding.run_in_thread(opened.pixels, self._to_tensors, opened, image.param, budget)
                if self._settings.cache_bytes and result.pixel_values.nbytes <= self._settings.cache_bytes:
                    self._cache[key] = result
        except InvalidRequestError:
            self._metrics.images.inc(tags={"outcome": "refused"})
            raise
        self._metrics.images.inc(tags={"outcome": "ok"})
        return result

    async def ping(self) -> bool:
        return True

    def _to_tensors(self, opened: OpenedImage, param: str, budget: PixelBudget) -> PreprocessedImage:
        picture = decode_opened(opened, self._settings, param)
        try:
            features = self._processor(
                images=[picture], size=self._resolutions.processor_size(budget), return_tensors="pt"
            )
        except ValueError as exc:
            raise ImageError(f"The model's image processor refused the image: {exc}", param) from None
        t, h, w = (int(v) for v in features["image_grid_thw"][0])
        return PreprocessedImage(
            pixel_values=features["pixel_values"].to(self._dtype),
            grid_thw=(t, h, w),
            width=picture.width,
            height=picture.height,
            tokens=t * h * w // self._merge,
        )

    async def check_health(self) -> None:
        if self._client.is_closed:
            raise RuntimeError("the image fetch client is closed")
