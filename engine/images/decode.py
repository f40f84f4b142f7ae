"""Turn image bytes into a safe, upright RGB picture of bounded size, with Pillow, in bounded memory.

Two steps, so that a caller can weigh a replica-wide budget (engine/images/budget.py) by the pixels
an image will decode to before any of them is decoded:
- `open_image` reads the header only (Image.open is lazy). A JPEG is set to decode at the smallest
  DCT scale (1/2, 1/4 or 1/8) that still gives the pixels the caller keeps (`draft`); the pixels
  that will be decoded, and the aspect ratio, are checked there.
- `decode_opened` decodes the first frame only (an animation costs one frame), shrinks it to fit
  `max_side` before any other full-size copy is made, then orients it (EXIF) and flattens it to RGB
  at the small size. The peak is about one decoded copy and one converted copy: at most ~9 bytes
  per decoded pixel (RGBA: 4 decoded, 4 premultiplied for resampling, 1 for a first 2x reduction).

Pillow's own bomb guard (`Image.MAX_IMAGE_PIXELS`) and warnings filters are process-wide globals,
and decodes run in threads, so the limit here relies on neither.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.errors import ImageError
from serve_app.settings import ImageSettings

ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
# Modes resampled as they are; any other mode is converted to RGB(A) first.
_RESAMPLED_MODES = {"RGB", "RGBA", "L", "LA"}


@dataclass
class OpenedImage:
    """An image whose header has been read and checked; no pixel decoded yet."""

    image: Image.Image
    pixels: int  # what decoding will produce, at the scale it will decode at


def open_image(
    data: bytes, settings: ImageSettings, param: str | None = None, keep_pixels: int | None = None
) -> OpenedImage:
    """Read and check the header; `keep_pixels` is the most the caller keeps of the picture."""
    try:
        image = Image.open(io.BytesIO(data), formats=sorted(ACCEPTED_FORMATS))
    except Image.DecompressionBombError:
        raise ImageError(
            f"The image has more pixels than the limit of {settings.decoded_pixel_limit}.", param, code="image_too_large"
        ) from None
    except UnidentifiedImageError:
        raise ImageError("The data is not a supported image (PNG, JPEG, WebP, GIF or BMP).", param) from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise ImageError(f"The image could not be read: {exc}.", param) from None

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("The image has no pixels.", param)
    if max(width, height) / min(width, height) > settings.max_aspect_ratio:
        raise ImageError(
            f"The image's aspect ratio {width}x{height} exceeds {settings.max_aspect_ratio:g}:1.", param
        )
    try:
        # JPEG only (a no-op for the other formats): decode at a reduced scale, never below the kept size.
        image.draft(None, _kept_size(width, height, settings.max_side, keep_pixels))
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"The image could not be read: {exc}.", param) from None
    pixels = image.size[0] * image.size[1]
    if pixels > settings.decoded_pixel_limit:
        raise ImageError(
            f"The image is {width}x{height}: more pixels than the limit of {settings.decoded_pixel_limit}.",
            param,
            code="image_too_large",
        )
    return OpenedImage(image, pixels)


def decode_opened(opened: OpenedImage, settings: ImageSettings, param: str | None = None) -> Image.Image:
    """Decode the first frame, shrink to fit `max_side`, orient (EXIF) and flatten to RGB."""
    image = opened.image
    try:
        image.load()  # the first frame: Image.open leaves a multi-frame image on it, and nothing here seeks
        if image.mode not in _RESAMPLED_MODES:
            image = image.convert("RGBA" if _transparent(image) else "RGB")
        image.thumbnail((settings.max_side, settings.max_side), Image.Resampling.BICUBIC)
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated or corrupt data
        raise ImageError(f"The image data is corrupt or truncated: {exc}.", param) from None


def decode_image(
    data: bytes, settings: ImageSettings, param: str | None = None, keep_pixels: int | None = None
) -> Image.Image:
    """`open_image` then `decode_opened`: an upright RGB picture within `max_side`."""
    return decode_opened(open_image(data, settings, param, keep_pixels), settings, param)


def _kept_size(width: int, height: int, max_side: int, keep_pixels: int | None) -> tuple[int, int]:
    """The size the picture is kept at: within max_side x max_side, and about keep_pixels in area."""
    scale = min(1.0, max_side / max(width, height))
    if keep_pixels:
        scale = min(scale, math.sqrt(keep_pixels / (width * height)))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _transparent(image: Image.Image) -> bool:
    return image.mode in ("PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas laid on white, as a person sees them on a page."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
