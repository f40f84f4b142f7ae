"""Images outside the demo model's world, drawn with Pillow from a seeded `random.Random`.

Photo-like images (gradients, noise, textures, blurred blobs, a rough landscape) and
screenshot-like images (panels, buttons, lines of tiny text). The model learns to answer any
question about them with one short honest sentence, so none of them may look like a lesson:
never a few flat shapes on a plain background, never a single large word, never one flat color.

Every drawer takes the random stream and the size and nothing else, so an image is a pure
function of its sample's seed and index. Randomness comes only from `rng` (never from Pillow's
own noise generators, which draw from the C library's unseeded state).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Sizes of photos and screenshots as clients send them: the processor scales large ones down to
# at most 224 x 224 pixels, and small ones to a few image tokens.
OUTSIDE_SIZES: tuple[tuple[int, int], ...] = (
    (64, 64), (96, 96), (128, 128), (160, 120), (224, 224), (256, 256),
    (320, 240), (240, 320), (400, 300), (300, 200), (512, 384), (448, 252),
)  # fmt: skip


# Screens are large: the processor scales them down, so their text ends up a few pixels high.
SCREEN_SIZES: tuple[tuple[int, int], ...] = (
    (224, 224), (256, 256), (320, 240), (240, 320), (400, 300), (300, 200),
    (512, 384), (448, 252), (180, 320), (320, 180),
)  # fmt: skip


def _random_rgb(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def _far_apart(rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    """`n` random colors, each far from the previous one, so no picture is nearly one color."""
    colors = [_random_rgb(rng)]
    while len(colors) < n:
        candidate = _random_rgb(rng)
        if math.dist(candidate, colors[-1]) > 150:
            colors.append(candidate)
    return colors


def _noise(rng: random.Random, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * channels))


def _grain(rng: random.Random, image: Image.Image, amount: float) -> Image.Image:
    """Photo grain: the image blended with seeded noise."""
    return Image.blend(image, _noise(rng, image.size), amount)


def gradient(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A linear or radial blend between two or three distant colors, with grain."""
    first, second, third = _far_apart(rng, 3)
    if rng.random() < 0.5:
        mask = Image.linear_gradient("L").rotate(rng.uniform(0, 360), resample=Image.Resampling.BICUBIC, expand=True)
        mask = mask.crop((64, 64, mask.width - 64, mask.height - 64))
    else:
        mask = Image.radial_gradient("L")
    mask = mask.resize(size, Image.Resampling.BILINEAR)
    image = Image.composite(Image.new("RGB", size, first), Image.new("RGB", size, second), mask)
    if rng.random() < 0.5:  # a third color over one half, blended in softly
        band = Image.linear_gradient("L").resize(size).rotate(rng.choice((0, 90, 180, 270)))
        image = Image.composite(Image.new("RGB", size, third), image, band.point(lambda v: v // 2))
    return _grain(rng, image, rng.uniform(0.03, 0.12))


def noise(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Colored noise: per pixel, or coarse cells scaled up smoothly (a cloudy texture)."""
    w, h = size
    if rng.random() < 0.4:
        return _noise(rng, size)
    cells = rng.choice((4, 6, 8, 12, 16))
    coarse = _noise(rng, (max(2, w // cells), max(2, h // cells)))
    image = coarse.resize(size, rng.choice((Image.Resampling.BICUBIC, Image.Resampling.NEAREST)))
    return _grain(rng, image, rng.uniform(0.05, 0.3))


def texture(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A repeated pattern (stripes, checks or dots) in random colors, rotated, with grain."""
    w, h = size
    side = int(math.hypot(w, h)) + 4
    a, b = _far_apart(rng, 2)
    image = Image.new("RGB", (side, side), a)
    draw = ImageDraw.Draw(image)
    step = rng.randint(4, 14)
    kind = rng.choice(("stripes", "checks", "dots"))
    for i in range(0, side, step):
        if kind == "stripes":
            draw.rectangle((i, 0, i + step // 2, side), fill=b)
        else:
            for j in range(0, side, step):
                if kind == "checks" and (i // step + j // step) % 2:
                    draw.rectangle((i, j, i + step - 1, j + step - 1), fill=b)
                elif kind == "dots":
                    r = step / 3
                    draw.ellipse((i + step / 2 - r, j + step / 2 - r, i + step / 2 + r, j + step / 2 + r), fill=b)
    image = image.rotate(rng.uniform(0, 180), resample=Image.Resampling.BILINEAR)
    left, top = (side - w) // 2, (side - h) // 2
    return _grain(rng, image.crop((left, top, left + w, top + h)), rng.uniform(0.05, 0.25))


def blobs(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Many overlapping ellipses in random colors, blurred: an out-of-focus photo."""
    w, h = size
    image = Image.new("RGB", size, _random_rgb(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(12, 40)):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.05, 0.35) * w, rng.uniform(0.05, 0.35) * h
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_random_rgb(rng))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(2, 0.04 * max(w, h) + 2)))
    return _grain(rng, image, rng.uniform(0.02, 0.1))


def landscape(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Sky over ground with blurred trees or rocks: the rough layout of an outdoor photo."""
    w, h = size
    sky_top = (rng.randint(40, 140), rng.randint(90, 190), rng.randint(170, 255))
    sky_low = tuple(min(255, c + rng.randint(40, 90)) for c in sky_top)
    ground = (rng.randint(40, 140), rng.randint(70, 160), rng.randint(20, 80))
    mask = Image.linear_gradient("L").resize(size)
    image = Image.composite(Image.new("RGB", size, sky_low), Image.new("RGB", size, sky_top), mask)
    draw = ImageDraw.Draw(image)
    horizon = rng.uniform(0.4, 0.7) * h
    hills = [(x, horizon + rng.uniform(-0.1, 0.1) * h) for x in range(0, w + 16, 16)]
    draw.polygon([(0, h), *hills, (w, h)], fill=ground)
    for _ in range(rng.randint(5, 20)):
        cx, cy = rng.uniform(0, w), rng.uniform(horizon - 0.1 * h, h)
        r = rng.uniform(0.03, 0.12) * w
        shade = tuple(max(0, min(255, c + rng.randint(-50, 30))) for c in ground)
        draw.ellipse((cx - r, cy - 1.6 * r, cx + r, cy + r), fill=shade)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5)))
    return _grain(rng, image, rng.uniform(0.03, 0.12))


PHOTO_DRAWERS: dict[str, Callable[[random.Random, tuple[int, int]], Image.Image]] = {
    "gradient": gradient,
    "noise": noise,
    "texture": texture,
    "blobs": blobs,
    "landscape": landscape,
}


@lru_cache(maxsize=16)
def _tiny_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    font = ImageFont.load_default(size=size)
    # Latin gibberish needs no complex shaping; the basic layout draws the same pixels faster.
    return font.font_variant(layout_engine=ImageFont.Layout.BASIC) if isinstance(font, ImageFont.FreeTypeFont) else font


def _gibberish(rng: random.Random, words: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(words))


def _text_line(
    draw: ImageDraw.ImageDraw, rng: random.Random, x: int, y: int, px: int, words: int, ink: tuple[int, ...]
) -> None:
    """A line of tiny text: real glyphs, or word-sized strokes (what small text becomes once the
    processor scales a screen down, and far cheaper to draw)."""
    if rng.random() < 0.2:
        draw.text((x, y), _gibberish(rng, words), font=_tiny_font(px), fill=ink)
        return
    for _ in range(words):
        width = rng.randint(2, 9) * px // 2
        draw.rectangle((x, y + px // 4, x + width, y + px - 1), fill=ink)
        x += width + max(2, px // 2)


def screenshot(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A user interface: title bar, sidebar or cards, buttons, and many lines of tiny text."""
    w, h = size
    dark = rng.random() < 0.3
    page = (rng.randint(20, 50),) * 3 if dark else (rng.randint(235, 255),) * 3
    ink = (225, 225, 225) if dark else (rng.randint(0, 70),) * 3
    accent = _random_rgb(rng)
    image = Image.new("RGB", size, page)
    draw = ImageDraw.Draw(image)
    bar = rng.randint(10, max(11, h // 10))
    draw.rectangle((0, 0, w, bar), fill=accent)
    left = 0
    if rng.random() < 0.6:  # a sidebar with menu lines
        left = rng.randint(w // 6, w // 3)
        draw.rectangle((0, bar, left, h), fill=tuple(max(0, c - 25) for c in page))
        for y in range(bar + 6, h - 8, rng.randint(10, 16)):
            _text_line(draw, rng, 4, y, rng.randint(7, 10), rng.randint(1, 2), ink)
    y = bar + rng.randint(4, 10)
    while y < h - 8:
        if rng.random() < 0.2:  # a row of buttons
            x = left + 6
            for _ in range(rng.randint(2, 5)):
                bw, bh = rng.randint(14, 40), rng.randint(7, 12)
                if x + bw > w - 4:
                    break
                draw.rectangle((x, y, x + bw, y + bh), fill=_random_rgb(rng))
                x += bw + rng.randint(3, 8)
            y += 16
        else:
            px = rng.randint(6, 11)
            _text_line(draw, rng, left + 6, y, px, rng.randint(3, 12), ink)
            y += px + rng.randint(2, 6)
    return image
