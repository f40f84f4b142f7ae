"""The image pipeline: data URLs, safe fetching and Pillow decoding, without Ray."""

from __future__ import annotations

import asyncio
import io
import ipaddress

import pytest
from PIL import Image

from engine.images.decode import decode_image
from engine.images.fetch import AddressPolicy, decode_data_url, load_image_bytes, make_client
from serve_app.errors import ImageError
from serve_app.settings import ImageSettings
from tests.support.images import ImageServer, data_url, png_bytes

SETTINGS = ImageSettings()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(encode(Image.new("RGB", (30, 20), (10, 200, 30)), fmt), SETTINGS)
    assert image.mode == "RGB" and image.size == (30, 20)


def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = decode_image(data, SETTINGS).getpixel((8, 8))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif)
    assert decode_image(data, SETTINGS).size == (20, 40)


def test_large_images_shrink_to_fit_max_side_keeping_aspect() -> None:
    image = decode_image(encode(Image.new("RGB", (3000, 1500)), "PNG"), ImageSettings(max_side=1024))
    assert image.size == (1024, 512)


def test_transparency_is_laid_on_white() -> None:
    data = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    assert decode_image(data, SETTINGS).getpixel((4, 4)) == (255, 255, 255)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")  # tiny file, 400 megapixels
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="pixels"):
        decode_image(bomb, SETTINGS, "p")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"definitely not an image", "not a supported image"),
        (png_bytes((64, 64))[:60], "corrupt|truncated|could not be read|not a supported"),
    ],
)
def test_garbage_and_truncated_bytes_are_typed_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data, SETTINGS, "messages[0].content[0]")


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(ImageError, match="aspect ratio"):
        decode_image(encode(Image.new("RGB", (1, 500)), "PNG"), SETTINGS)


def test_data_url_round_trip_and_errors() -> None:
    raw = png_bytes()
    assert decode_data_url(data_url(raw), SETTINGS, "p") == raw
    for bad in ("data:image/png;base64,!!!", "data:text/plain;base64,aGk=", "data:image/png,rawdata", "data:;base64,aGk="):
        with pytest.raises(ImageError):
            decode_data_url(bad, SETTINGS, "p")
    with pytest.raises(ImageError, match="larger than"):
        decode_data_url(data_url(b"x" * 2000), ImageSettings(max_image_bytes=1000), "p")


@pytest.mark.parametrize(
    "address, allowed",
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo: its IPv4 client address is obfuscated
        ("2001::1", False),
        ("::", False),
        ("100::1", False),
        ("2606:4700::1111", True),
    ],
)
def test_address_policy_refuses_non_public_addresses(address: str, allowed: bool) -> None:
    assert AddressPolicy([]).address_allowed(ipaddress.ip_address(address)) is allowed


def test_address_policy_allows_configured_networks() -> None:
    policy = AddressPolicy(["127.0.0.0/8", "images.internal"])
    assert policy.address_allowed(ipaddress.ip_address("127.0.0.5"))
    assert policy.address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert policy.host_allowed("images.internal")
    assert not policy.address_allowed(ipaddress.ip_address("10.0.0.1"))


def fetch(url: str, settings: ImageSettings) -> bytes:
    async def run() -> bytes:
        async with make_client(settings) as client:
            return await load_image_bytes(url, settings, client, "messages[0].content[1]")

    return asyncio.run(run())


def test_fetch_follows_redirects_and_rechecks_each_hop(image_server: ImageServer) -> None:
    image_server.files["/a.png"] = (png_bytes(), "image/png")
    image_server.redirects["/go"] = "/a.png"
    image_server.redirects["/away"] = "http://10.0.0.1/x.png"
    allowed = ImageSettings(allowed_hosts=["127.0.0.1"])
    assert fetch(image_server.url("/go"), allowed) == png_bytes()
    with pytest.raises(ImageError) as info:
        fetch(image_server.url("/away"), allowed)
    assert info.value.code == "image_url_forbidden" and info.value.param == "messages[0].content[1]"


def test_fetch_refuses_loopback_unless_allowed(image_server: ImageServer) -> None:
    image_server.files["/b.png"] = (png_bytes(), "image/png")
    for url in (image_server.url("/b.png"), image_server.url("/b.png", host="localhost")):
        with pytest.raises(ImageError) as info:
            fetch(url, SETTINGS)
        assert info.value.code == "image_url_forbidden"
    assert image_server.hits("/b.png") == 0


def test_fetch_caps_size_and_keeps_upstream_errors_to_itself(image_server: ImageServer) -> None:
    image_server.files["/big.png"] = (b"x" * 5000, "image/png")
    settings = ImageSettings(allowed_hosts=["127.0.0.1"], max_image_bytes=1000)
    with pytest.raises(ImageError, match="larger than"):
        fetch(image_server.url("/big.png"), settings)
    with pytest.raises(ImageError) as info:
        fetch(image_server.url("/missing.png"), settings)
    assert info.value.code == "image_fetch_failed" and "404" not in info.value.message
    with pytest.raises(ImageError, match="http"):
        fetch("ftp://example.com/a.png", settings)
