"""What decoding an image costs in memory, measured as a fresh process's peak RSS (Linux): small files that
decode to hundreds of megabytes are refused from their header, JPEGs decode at the scale that is
kept, and an image at the limit costs about one decoded copy and one conversion."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.images.decode import decode_image, open_image
from serve_app.errors import ImageError
from serve_app.settings import ImageSettings
from tests.support.images import pixel_bomb

ROOT = Path(__file__).resolve().parents[3]
MIB = 1 << 20

# Decodes argv[1] with ImageSettings(argv[2]) and prints how far the peak RSS rose above the RSS
# before it (Linux: writing 5 to clear_refs resets the peak, VmHWM, to the current RSS). Small images
# of each format are decoded first, so that loading Pillow's plugins is not counted.
_MEASURE = """
import json, sys
from engine.images.decode import decode_image
from serve_app.errors import ImageError
from serve_app.settings import ImageSettings
from tests.support.images import png_bytes

def status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

settings = ImageSettings.model_validate_json(sys.argv[2])
for fmt in ("PNG", "JPEG"):
    decode_image(png_bytes((64, 48), fmt=fmt), settings)
data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_bytes("VmRSS")
try:
    outcome = list(decode_image(data, settings, "p").size)
except ImageError as error:
    outcome = error.code
print(json.dumps({"grew_bytes": status_bytes("VmHWM") - before, "outcome": outcome}))
"""


def decode_in_fresh_process(data: bytes, settings: ImageSettings, tmp_path: Path) -> tuple[object, int]:
    image_path = tmp_path / "image.bin"
    image_path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(image_path), settings.model_dump_json(exclude_unset=True)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["outcome"], result["grew_bytes"]


def jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, "JPEG", quality=60)
    return buffer.getvalue()


def test_a_small_png_that_decodes_to_hundreds_of_megabytes_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = pixel_bomb((6300, 6300), "RGBA")  # 40 M pixels, about 160 MB as RGBA, in ~170 KB
    assert len(bomb) < 200_000
    outcome, grew = decode_in_fresh_process(bomb, ImageSettings(), tmp_path)
    assert outcome == "image_too_large"
    assert grew < 16 * MIB, f"{grew / MIB:.0f} MiB to refuse it"


def test_a_large_jpeg_decodes_at_the_scale_that_is_kept(tmp_path: Path) -> None:
    """36 M pixels in the header; decoded at 1/4 scale (1500x1500), as max_side keeps 1024."""
    photo = jpeg((6000, 6000))
    outcome, grew = decode_in_fresh_process(photo, ImageSettings(), tmp_path)
    assert outcome == [1024, 1024]
    assert grew < 48 * MIB, f"{grew / MIB:.0f} MiB to decode it"
    # With a smaller pixel budget (a request's detail), it decodes smaller still: at 1/8.
    assert open_image(photo, ImageSettings()).pixels == 1500 * 1500
    assert open_image(photo, ImageSettings(), keep_pixels=224 * 224).pixels == 750 * 750


def test_an_image_at_the_limit_decodes_in_about_one_copy_and_one_conversion(tmp_path: Path) -> None:
    """RGBA is the costliest common mode: 4 bytes a pixel decoded, 4 more premultiplied for
    resampling, 1 for the first reduction by 2; nothing else at full size."""
    side = 4096  # 16.8 M pixels: the default limit
    settings = ImageSettings(max_decoded_pixels=side * side)
    outcome, grew = decode_in_fresh_process(pixel_bomb((side, side), "RGBA"), settings, tmp_path)
    assert outcome == [1024, 1024]
    assert grew < 9.5 * side * side + 16 * MIB, f"{grew / (side * side):.1f} bytes per pixel"


def test_the_default_pixel_limit_follows_what_max_side_keeps() -> None:
    """16 x max_side^2: a picture is kept at max_side at most, so 4 times that per side is plenty."""
    assert ImageSettings().decoded_pixel_limit == 16 * 1024 * 1024
    small = ImageSettings(max_side=256)
    assert small.decoded_pixel_limit == 16 * 256 * 256
    with pytest.raises(ImageError) as info:
        decode_image(pixel_bomb((1100, 1000), "RGB"), small, "p")
    assert info.value.code == "image_too_large"
    assert decode_image(pixel_bomb((1100, 1000), "RGB"), ImageSettings()).size == (1024, 931)
