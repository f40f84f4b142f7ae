"""Turn image bytes into a safe, upright RGB picture of bounded size, with Pillow.

The pixel count is checked from the header before any pixel is decoded, so decompression bombs
cost nothing; Pillow's own bomb guard is a process-wide global, so we do not rely on it.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.errors import ImageError
from serve_app.settings import ImageSettings

ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


def decode_image(data: bytes, settings: ImageSettings, param: str | None = None) -> Image.Image:
    """Decode, check, orient (EXIF), flatten to RGB and shrink to fit `max_side`; first GIF frame."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(ACCEPTED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"The image has more pixels than the limit of {settings.max_decoded_pixels}.", param, code="image_too_large"
        ) from None
    except UnidentifiedImageError:
        raise ImageError("The data is not a supported image (PNG, JPEG, WebP, GIF or BMP).", param) from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise ImageError(f"The image could not be read: {exc}.", param) from None

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("The image has no pixels.", param)
    if width * height > settings.max_decoded_pixels:
        raise ImageError(
            f"The image has {width * height} pixels, more than the limit of {settings.max_decoded_pixels}.",
            param,
            code="image_too_large",
        )
    if max(width, height) / min(width, height) > settings.max_aspect_ratio:
        raise ImageError(
            f"The image's aspect ratio {width}x{height} exceeds {settings.max_aspect_ratio:g}:1.", param
        )

    try:
        image.seek(0)  # animated GIF/WebP/PNG: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"The image data is corrupt or truncated: {exc}.", param) from None

    rgb.thumbnail((settings.max_side, settings.max_side), Image.Resampling.BICUBIC)
    return rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas laid on white, as a person sees them on a page."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
