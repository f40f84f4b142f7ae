"""Random and mutated bytes never crash the image decoder: they decode or raise ImageError."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.images.decode import decode_image
from engine.images.fetch import decode_data_url
from serve_app.errors import ImageError
from serve_app.settings import ImageSettings

SETTINGS = ImageSettings(max_decoded_pixels=4_000_000)


def _seed_images() -> list[bytes]:
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
        buffer = io.BytesIO()
        Image.new("RGB", (23, 17), (12, 200, 90)).save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


SEEDS = _seed_images()


def decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, SETTINGS, "p")
    except ImageError as error:
        assert error.status_code == 400 and error.param == "p"
    else:
        assert image.mode == "RGB" and max(image.size) <= SETTINGS.max_side


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
       st.integers(0, 10_000))
def test_mutated_real_images(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    decodes_or_refuses(bytes(data[: max(1, len(data) - cut % len(data))]))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_data_urls(text: str) -> None:
    try:
        decode_data_url("data:image/png;base64," + text, SETTINGS, "p")
    except ImageError:
        pass
