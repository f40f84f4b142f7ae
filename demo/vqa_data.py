"""A seeded synthetic visual question-answering set, drawn with Pillow.

Each sample is a small image (shapes in named colors at positions, or a rendered word or number),
a question in English or Chinese, a short-sentence answer in the question's language, and a
`question_type` (shape, color, count, text, position). The demo model is trained and evaluated on
it, and the web page can offer its images as examples.

Beyond those five core types, `EXTRA_TYPES` teach the model to behave sensibly at the edges of its
world: a picture that is one color all over ("What color is this?" -> "It is red."), one large
shape asked about without its name, and, for photo-like or screenshot-like pictures, requests
without an image and questions outside the lessons, one short honest sentence
(`wordings.HONEST_ANSWER`). Questions come in wording families (`wordings.py`), some held out of
training, and every sample records the family it used.

Every sample is a pure function of `(split seed, index)`, so a data loader worker can draw any
sample on its own, a training run resumes on exactly the batches it would have seen, and the
train, validation and test splits never share a random stream.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from demo.outside_images import OUTSIDE_SIZES, PHOTO_DRAWERS, SCREEN_SIZES, screenshot
from demo.wordings import (
    CANVAS_QUESTIONS,
    CORE_PARAPHRASES,
    DESCRIBE_QUESTIONS,
    HONEST_ANSWER,
    OFF_TOPIC_QUESTIONS,
    SCENE_COLOR_QUESTIONS,
    TRAIN_FAMILIES,
    fill,
)

QUESTION_TYPES: tuple[str, ...] = ("shape", "color", "count", "text", "position")
LANGUAGES: tuple[str, ...] = ("en", "zh")
# Distinct seeds per split: the splits are different random streams, not slices of one.
SPLIT_SEEDS: dict[str, int] = {"train": 1_000_003, "validation": 2_000_003, "test": 3_000_017}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
SHAPE_PLURAL: dict[str, str] = {s: s + "s" for s in SHAPES}
SHAPE_ZH: dict[str, str] = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "星形",
    "hexagon": "六边形",
}
# The noun a Chinese speaker counts with ("几个圆", not "几个圆形").
SHAPE_ZH_NOUN: dict[str, str] = {**SHAPE_ZH, "circle": "圆"}

# Named colors, each far enough from the others (and from the near-white background) that a
# little jitter never makes a name ambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 0),
    "orange": (255, 135, 0),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
    "gray": (130, 130, 130),
    "pink": (255, 110, 190),
    "brown": (130, 75, 20),
}
COLOR_ZH: dict[str, str] = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "orange": "橙色",
    "purple": "紫色",
    "black": "黑色",
    "gray": "灰色",
    "pink": "粉色",
    "brown": "棕色",
}
# Text is drawn in the darker colors only, so thin strokes stay readable on a light background.
TEXT_COLORS: tuple[str, ...] = ("red", "green", "blue", "purple", "black", "brown")

WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "MOON", "TREE", "BOOK", "FISH", "BIRD",
    "CAKE", "RAIN", "SHIP", "LAMP", "KING", "MILK", "ROSE", "WIND",
    "HELLO", "WORLD", "APPLE", "HOUSE", "WATER", "MUSIC", "HAPPY", "LIGHT",
)  # fmt: skip

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Where each named position puts an object's center, as fractions of width and height.
POSITION_XY: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
POSITION_EN: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
POSITION_ZH: dict[str, str] = {"left": "左边", "right": "右边", "top": "上边", "bottom": "下边", "center": "中间"}

NUMBER_EN: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
NUMBER_ZH: tuple[str, ...] = ("零", "一", "两", "三", "四", "五", "六")
MAX_COUNT = 5

# Image sizes (width, height): all at most 224 x 224, the processor's cap (64 image tokens).
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (196, 196), (168, 168), (224, 168), (168, 224))

# Question phrasings per (type, language); `{shape}` is filled with the name in that language.
QUESTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("shape", "en"): (
        "What shape is this?",
        "What shape is shown in the image?",
        "Which shape do you see?",
        "Name the shape in the picture.",
    ),
    ("shape", "zh"): ("这是什么形状?", "图中是什么形状？", "图里画的是什么形状?"),
    ("color", "en"): (
        "What color is the {shape}?",
        "Which color does the {shape} have?",
        "Tell me the color of the {shape}.",
    ),
    ("color", "zh"): ("{shape}是什么颜色?", "图中的{shape}是什么颜色？", "{shape}的颜色是什么?"),
    ("count", "en"): (
        "How many {shapes} are there?",
        "How many {shapes} are in the image?",
        "Count the {shapes}.",
    ),
    ("count", "zh"): ("图里有几个{shape}?", "图中有多少个{shape}？", "数一数有几个{shape}。"),
    ("text", "en"): ("What word is written?", "What is written in the image?", "What does the text say?"),
    ("text", "zh"): ("图中写的是什么字?", "图里写着什么？", "上面写的是什么?"),
    ("position", "en"): ("Where is the {shape}?", "Where is the {shape} in the image?"),
    ("position", "zh"): ("{shape}在哪里?", "图中的{shape}在什么位置？"),
}


@dataclass(frozen=True)
class DrawnObject:
    """One shape as drawn: its name, color name, center and radius in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    radius: float


@dataclass
class VQASample:
    """One question about one image (or none), with its answer and what was drawn (for checks).

    `wording` is the family of the question's phrasing (`wordings.WORDING_FAMILIES`); `subject`
    the shape the question names, if it names one.
    """

    image: Image.Image | None
    question: str
    answer: str
    question_type: str
    lang: str
    objects: list[DrawnObject] = field(default_factory=list)
    text: str | None = None
    split: str = ""
    index: int = -1
    wording: str = "base"
    subject: str | None = None


# ----------------------------------------------------------------------------------------------
# Drawing


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 15) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    # Near-white with a slight tint: varied, yet never mistaken for a named color.
    shade = (rng.randint(235, 255), rng.randint(235, 255), rng.randint(235, 255))
    return Image.new("RGB", size, shade)


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _polygon_points(cx: float, cy: float, r: float, sides: int, start: float) -> list[tuple[float, float]]:
    import math

    return [
        (cx + r * math.cos(start + k * 2 * math.pi / sides), cy + r * math.sin(start + k * 2 * math.pi / sides))
        for k in range(sides)
    ]


def draw_object(draw: ImageDraw.ImageDraw, obj: DrawnObject, fill: tuple[int, int, int]) -> None:
    """Draw one shape filled with `fill`, fitted inside the circle (cx, cy, radius)."""
    import math

    cx, cy, r = obj.cx, obj.cy, obj.radius
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = r * 0.8
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        # Point-up triangle, its centroid lowered a little so it looks centered.
        draw.polygon(_polygon_points(cx, cy + r * 0.15, r * 1.05, 3, -math.pi / 2), fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star_points(cx, cy, r * 1.05), fill=fill)
    elif obj.shape == "hexagon":
        draw.polygon(_polygon_points(cx, cy, r, 6, 0.0), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _place(
    rng: random.Random, size: tuple[int, int], count: int, r_range: tuple[float, float]
) -> list[tuple[float, float, float]]:
    """`count` non-overlapping circles (cx, cy, r) inside the image, by rejection sampling."""
    w, h = size
    side = min(w, h)
    for _ in range(200):
        placed: list[tuple[float, float, float]] = []
        for _ in range(count):
            for _ in range(100):
                r = rng.uniform(*r_range) * side
                cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
                # A gap of a few pixels keeps neighbours separate, which counting needs.
                if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 4) ** 2 for x, y, q in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == count:
            return placed
    raise RuntimeError(f"could not place {count} objects in {size}")


def render_scene(rng: random.Random, size: tuple[int, int], objects: list[DrawnObject]) -> Image.Image:
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj, _jitter(COLORS[obj.color], rng))
    return image


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow >= 10.1 ships a scalable default font, so text renders the same offline everywhere.
    return ImageFont.load_default(size=size)


def render_text(rng: random.Random, size: tuple[int, int], text: str) -> Image.Image:
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    w, h = size
    font_size = rng.randint(34, 52)
    font = _font(font_size)
    # Shrink the font until the text fits with a margin (long words on narrow images).
    while True:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= w - 16 or font_size <= 14:
            break
        font_size -= 2
        font = _font(font_size)
    tw, th = right - left, bottom - top
    x = rng.uniform(8, max(8.0, w - tw - 8)) - left
    y = rng.uniform(8, max(8.0, h - th - 8)) - top
    draw.text((x, y), text, font=font, fill=_jitter(COLORS[rng.choice(TEXT_COLORS)], rng, 10))
    return image


# ----------------------------------------------------------------------------------------------
# Questions and answers


def _count_answer(shape: str, n: int, lang: str) -> str:
    if lang == "zh":
        return f"图里有{NUMBER_ZH[n]}个{SHAPE_ZH_NOUN[shape]}。"
    if n == 1:
        return f"There is one {shape}."
    return f"There are {NUMBER_EN[n]} {SHAPE_PLURAL[shape]}."


def _question(rng: random.Random, qtype: str, lang: str, shape: str | None = None) -> str:
    template = rng.choice(QUESTIONS[(qtype, lang)])
    if shape is None:
        return template
    if lang == "zh":
        return template.format(shape=SHAPE_ZH_NOUN[shape])
    return template.format(shape=shape, shapes=SHAPE_PLURAL[shape])


def _shape_sample(rng: random.Random, size: tuple[int, int], lang: str) -> VQASample:
    ((cx, cy, r),) = _place(rng, size, 1, (0.18, 0.32))
    obj = DrawnObject(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, r)
    answer = f"这是{SHAPE_ZH[obj.shape]}。" if lang == "zh" else f"It is a {obj.shape}."
    return VQASample(render_scene(rng, size, [obj]), _question(rng, "shape", lang), answer, "shape", lang, [obj])


def _color_sample(rng: random.Random, size: tuple[int, int], lang: str) -> VQASample:
    shapes = rng.sample(SHAPES, rng.randint(1, 3))  # distinct shapes: "the square" is unique
    spots = _place(rng, size, len(shapes), (0.12, 0.2))
    objects = [DrawnObject(s, rng.choice(list(COLORS)), x, y, r) for s, (x, y, r) in zip(shapes, spots)]
    target = rng.choice(objects)
    if lang == "zh":
        answer = f"{SHAPE_ZH_NOUN[target.shape]}是{COLOR_ZH[target.color]}的。"
    else:
        answer = f"The {target.shape} is {target.color}."
    question = _question(rng, "color", lang, target.shape)
    return VQASample(render_scene(rng, size, objects), question, answer, "color", lang, objects, subject=target.shape)


def _count_sample(rng: random.Random, size: tuple[int, int], lang: str) -> VQASample:
    target = rng.choice(SHAPES)
    n = rng.randint(1, MAX_COUNT)
    others = [s for s in SHAPES if s != target]
    distractors = [rng.choice(others) for _ in range(rng.randint(0, min(2, 6 - n)))]
    shapes = [target] * n + distractors
    rng.shuffle(shapes)
    spots = _place(rng, size, len(shapes), (0.07, 0.1))
    objects = [DrawnObject(s, rng.choice(list(COLORS)), x, y, r) for s, (x, y, r) in zip(shapes, spots)]
    question = _question(rng, "count", lang, target)
    answer = _count_answer(target, n, lang)
    return VQASample(render_scene(rng, size, objects), question, answer, "count", lang, objects, subject=target)


def _text_sample(rng: random.Random, size: tuple[int, int], lang: str) -> VQASample:
    is_word = rng.random() < 0.6
    text = rng.choice(WORDS) if is_word else str(rng.randint(0, 9))
    if lang == "zh":
        answer = f"写的是{text}。"
    else:
        answer = f"The word is {text}." if is_word else f"The digit is {text}."
    question = _question(rng, "text", lang)
    return VQASample(render_text(rng, size, text), question, answer, "text", lang, [], text)


def _position_sample(rng: random.Random, size: tuple[int, int], lang: str) -> VQASample:
    w, h = size
    where = rng.choice(POSITIONS)
    fx, fy = POSITION_XY[where]
    r = rng.uniform(0.1, 0.14) * min(w, h)
    # A little wobble, never enough to cross into a neighbouring zone.
    cx, cy = fx * w + rng.uniform(-0.05, 0.05) * w, fy * h + rng.uniform(-0.05, 0.05) * h
    obj = DrawnObject(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, r)
    if lang == "zh":
        answer = f"{SHAPE_ZH_NOUN[obj.shape]}在{POSITION_ZH[where]}。"
    else:
        answer = f"The {obj.shape} is {POSITION_EN[where]}."
    question = _question(rng, "position", lang, obj.shape)
    return VQASample(render_scene(rng, size, [obj]), question, answer, "position", lang, [obj], subject=obj.shape)


_MAKERS = {
    "shape": _shape_sample,
    "color": _color_sample,
    "count": _count_sample,
    "text": _text_sample,
    "position": _position_sample,
}


def make_sample(seed: int, index: int, size: tuple[int, int] | None = None) -> VQASample:
    """Sample `index` of the stream seeded by `seed`: types and languages cycle evenly.

    `size` (width, height) overrides the drawn image size; training uses it to give every image
    of a batch the same size, which lets the vision tower attend over the batch in one call.
    """
    # String seeds hash the same in every process (unlike hash()), so workers agree.
    rng = random.Random(f"vqa:{seed}:{index}")
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    lang = LANGUAGES[(index // len(QUESTION_TYPES)) % len(LANGUAGES)]
    drawn_size = rng.choice(IMAGE_SIZES)
    return _MAKERS[qtype](rng, size or drawn_size, lang)


def split_seed(split: str) -> int:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split]


def generate(split: str, n: int, start: int = 0) -> list[VQASample]:
    """Samples `start .. start+n-1` of `split` (train, validation or test)."""
    return list(iter_split(split, n, start))


def iter_split(split: str, n: int, start: int = 0) -> Iterator[VQASample]:
    seed = split_seed(split)
    for index in range(start, start + n):
        sample = make_sample(seed, index)
        sample.split, sample.index = split, index
        yield sample


# ----------------------------------------------------------------------------------------------
# Beyond the core types: wordings, simple scenes, and pictures outside the model's world

EXTRA_TYPES: tuple[str, ...] = ("canvas", "scene", "photo", "screenshot", "no_image", "off_topic")
# The kinds whose answer is always the honest sentence.
OUT_OF_WORLD_TYPES: tuple[str, ...] = ("photo", "screenshot", "no_image", "off_topic")
ALL_TYPES: tuple[str, ...] = QUESTION_TYPES + EXTRA_TYPES

# A picture that is one color all over, as small as a client's 16 x 16 swatch or as large as a
# photo: the processor turns them into 1 to 64 image tokens, and the model must see each layout.
CANVAS_SIZES: tuple[tuple[int, int], ...] = (
    (16, 16), (32, 32), (48, 48), (64, 64), (100, 100), (128, 128),
    (168, 168), (224, 224), (256, 256), (320, 240), (512, 512), (300, 150),
)  # fmt: skip
# One large shape: at 64 x 64 pixels it is still four image tokens, the least that shows a shape.
SCENE_SIZES: tuple[tuple[int, int], ...] = (
    (64, 64), (96, 96), (128, 128), (168, 168), (224, 224), (256, 256), (320, 240), (200, 300),
)  # fmt: skip
# Shares of the question kinds asked of a photo, a screenshot or no image: a lesson's question
# (which has no answer there), an open question about the picture, or one outside any lesson.
_ANY_QUESTION_SHARES: dict[str, float] = {"lesson": 0.5, "describe": 0.3, "off_topic": 0.2}


def wording_table(qtype: str, lang: str) -> dict[str, tuple[str, ...]]:
    """The templates of every wording family for a question kind ("describe" included)."""
    if qtype in QUESTION_TYPES:
        return {"base": QUESTIONS[(qtype, lang)], **CORE_PARAPHRASES[(qtype, lang)]}
    tables = {
        "canvas": CANVAS_QUESTIONS,
        "scene": SCENE_COLOR_QUESTIONS,
        "off_topic": OFF_TOPIC_QUESTIONS,
        "describe": DESCRIBE_QUESTIONS,
    }
    return tables[qtype][lang]


def _ask(
    rng: random.Random, qtype: str, lang: str, families: tuple[str, ...], shape: str | None = None
) -> tuple[str, str]:
    """(family, question): a family drawn evenly among `families`, then one of its templates."""
    table = wording_table(qtype, lang)
    present = [f for f in families if table.get(f)]
    family = rng.choice(present)
    return family, fill(rng.choice(table[family]), lang, shape, SHAPE_ZH_NOUN)


def reword(sample: VQASample, rng: random.Random, families: tuple[str, ...]) -> VQASample:
    """The core sample asked in another wording family (same image, same answer)."""
    sample.wording, sample.question = _ask(rng, sample.question_type, sample.lang, families, sample.subject)
    return sample


def _canvas_image(rng: random.Random, size: tuple[int, int], color: str) -> Image.Image:
    rgb = _jitter(COLORS[color], rng, 12)
    if rng.random() < 0.5:
        return Image.new("RGB", size, rgb)
    # Faint sensor-like noise: still one color to any eye, never a second color.
    amount = rng.randint(2, 6)
    span = 2 * amount + 1
    channels = [
        Image.frombytes("L", size, rng.randbytes(size[0] * size[1])).point(
            lambda v, c=c: max(0, min(255, c - amount + v % span))
        )
        for c in rgb
    ]
    return Image.merge("RGB", channels)


def _canvas_sample(rng: random.Random, size: tuple[int, int] | None, lang: str, families: tuple[str, ...]) -> VQASample:
    color = rng.choice(list(COLORS))
    image = _canvas_image(rng, size or rng.choice(CANVAS_SIZES), color)
    wording, question = _ask(rng, "canvas", lang, families)
    answer = f"这是{COLOR_ZH[color]}的。" if lang == "zh" else f"It is {color}."
    return VQASample(image, question, answer, "canvas", lang, wording=wording)


def _scene_sample(rng: random.Random, size: tuple[int, int] | None, lang: str, families: tuple[str, ...]) -> VQASample:
    size = size or rng.choice(SCENE_SIZES)
    ((cx, cy, r),) = _place(rng, size, 1, (0.2, 0.4))
    obj = DrawnObject(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, r)
    # Plain white, as a client's own drawing usually is, or the set's near-white.
    image = Image.new("RGB", size, (255, 255, 255)) if rng.random() < 0.4 else _background(rng, size)
    draw_object(ImageDraw.Draw(image), obj, _jitter(COLORS[obj.color], rng))
    if rng.random() < 0.6:
        wording, question = _ask(rng, "scene", lang, families)
        if lang == "zh":
            answer = f"{SHAPE_ZH_NOUN[obj.shape]}是{COLOR_ZH[obj.color]}的。"
        else:
            answer = f"The {obj.shape} is {obj.color}."
    else:
        wording, question = _ask(rng, "shape", lang, families)
        answer = f"这是{SHAPE_ZH[obj.shape]}。" if lang == "zh" else f"It is a {obj.shape}."
    return VQASample(image, question, answer, "scene", lang, [obj], wording=wording)


def _any_question(rng: random.Random, lang: str, families: tuple[str, ...]) -> tuple[str, str]:
    """A question of any kind the set knows, for a request the model cannot answer."""
    kind = rng.choices(list(_ANY_QUESTION_SHARES), list(_ANY_QUESTION_SHARES.values()))[0]
    if kind == "lesson":
        qtype = rng.choice(QUESTION_TYPES + ("canvas", "scene"))
        return _ask(rng, qtype, lang, families, rng.choice(SHAPES))
    return _ask(rng, kind, lang, families)


def _honest(image: Image.Image | None, qtype: str, lang: str, asked: tuple[str, str]) -> VQASample:
    wording, question = asked
    return VQASample(image, question, HONEST_ANSWER[lang], qtype, lang, wording=wording)


def _photo_sample(rng: random.Random, size: tuple[int, int] | None, lang: str, families: tuple[str, ...]) -> VQASample:
    drawer = PHOTO_DRAWERS[rng.choice(sorted(PHOTO_DRAWERS))]
    image = drawer(rng, size or rng.choice(OUTSIDE_SIZES))
    return _honest(image, "photo", lang, _any_question(rng, lang, families))


def _screenshot_sample(
    rng: random.Random, size: tuple[int, int] | None, lang: str, families: tuple[str, ...]
) -> VQASample:
    image = screenshot(rng, size or rng.choice(SCREEN_SIZES))
    return _honest(image, "screenshot", lang, _any_question(rng, lang, families))


def _no_image_sample(
    rng: random.Random, size: tuple[int, int] | None, lang: str, families: tuple[str, ...]
) -> VQASample:
    return _honest(None, "no_image", lang, _any_question(rng, lang, families))


def _off_topic_sample(
    rng: random.Random, size: tuple[int, int] | None, lang: str, families: tuple[str, ...]
) -> VQASample:
    # A picture from the model's world (a lesson's image, a plain color or one shape), asked
    # something no lesson answers: the image alone must not decide the answer.
    pick = rng.random()
    if pick < 0.6:
        image = _MAKERS[rng.choice(QUESTION_TYPES)](rng, size or rng.choice(IMAGE_SIZES), lang).image
    elif pick < 0.8:
        image = _canvas_sample(rng, size, lang, families).image
    else:
        image = _scene_sample(rng, size, lang, families).image
    return _honest(image, "off_topic", lang, _ask(rng, "off_topic", lang, families))


_EXTRA_MAKERS = {
    "canvas": _canvas_sample,
    "scene": _scene_sample,
    "photo": _photo_sample,
    "screenshot": _screenshot_sample,
    "no_image": _no_image_sample,
    "off_topic": _off_topic_sample,
}


def make_extra_sample(
    seed: int,
    index: int,
    qtype: str,
    *,
    families: tuple[str, ...] = TRAIN_FAMILIES,
    lang: str | None = None,
    size: tuple[int, int] | None = None,
) -> VQASample:
    """Sample `index` of kind `qtype` (one of `EXTRA_TYPES`) in the stream seeded by `seed`.

    Questions are worded from `families`; the language alternates with the index unless given.
    Each kind has a random stream of its own, apart from the core samples' streams.
    """
    if qtype not in _EXTRA_MAKERS:
        raise ValueError(f"unknown extra question type {qtype!r}; expected one of {EXTRA_TYPES}")
    rng = random.Random(f"{qtype}:{seed}:{index}")
    return _EXTRA_MAKERS[qtype](rng, size, lang or LANGUAGES[index % len(LANGUAGES)], families)


def type_shares(weights: dict[str, float] | None) -> list[float]:
    """Shares over `ALL_TYPES`: named types get their weight; unnamed core types split the rest.

    An extra type is drawn only when named, so a recipe that names core types alone draws the
    same samples as it did before the extra types existed.
    """
    weights = weights or {}
    unknown = set(weights) - set(ALL_TYPES)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; expected some of {ALL_TYPES}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) > 1 + 1e-9:
        raise ValueError(f"type weights must be >= 0 and sum to at most 1: {weights}")
    others = [t for t in QUESTION_TYPES if t not in weights]
    rest = max(0.0, 1 - sum(weights.values())) / max(1, len(others))
    return [weights.get(t, rest if t in QUESTION_TYPES else 0.0) for t in ALL_TYPES]


def training_sample(
    seed: int,
    index: int,
    size: tuple[int, int] | None = None,
    *,
    weights: dict[str, float] | None = None,
    paraphrase_fraction: float = 0.0,
) -> VQASample:
    """Training sample `index` of the stream `seed`: its type drawn from `weights`.

    No weights: `make_sample`'s even cycle of the core types. `size` applies to core samples (a
    batch shares one size); the extra kinds draw their own. A `paraphrase_fraction` of the core
    samples are asked in a training paraphrase instead of a base wording. Held-out wordings are
    never drawn here.
    """
    if weights:
        qtype = ALL_TYPES[random.Random(f"type:{seed}:{index}").choices(range(len(ALL_TYPES)), type_shares(weights))[0]]
        if qtype in QUESTION_TYPES:
            # make_sample picks the type from index % len(QUESTION_TYPES) (and the language from
            # the quotient), so this index has the drawn type and no other row's index.
            sample = make_sample(seed, index * len(QUESTION_TYPES) + QUESTION_TYPES.index(qtype), size)
        else:
            sample = make_extra_sample(seed, index, qtype)
    else:
        sample = make_sample(seed, index, size)
    if paraphrase_fraction and sample.question_type in QUESTION_TYPES:
        rng = random.Random(f"wording:{seed}:{index}")
        if rng.random() < paraphrase_fraction:
            reword(sample, rng, ("paraphrase",))
    return sample


def every_question(families: tuple[str, ...]) -> set[str]:
    """Every question the set can ask in `families`, all kinds, languages and shapes filled in."""
    kinds = QUESTION_TYPES + ("canvas", "scene", "off_topic", "describe")
    return {
        fill(template, lang, shape, SHAPE_ZH_NOUN)
        for lang in LANGUAGES
        for qtype in kinds
        for family in families
        for template in wording_table(qtype, lang).get(family, ())
        for shape in SHAPES
    }


# Evaluation rows beyond the core test: core questions in other wordings, then each extra type.
PARAPHRASE_ROW = "paraphrase"


def evaluation_set(split: str, n: int, extra: int = 0, *, held_out: bool = True) -> list[VQASample]:
    """The core samples `0 .. n-1` of `split`, then `extra` samples per extra row.

    Extra rows: the split's first `extra` core images asked in held-out wordings (training
    paraphrases when `held_out` is false), then `extra` samples of each `EXTRA_TYPES` kind, half in
    training wordings and, when `held_out`, half in held-out ones. Training picks its best weights
    with `held_out=False`, so the held-out wordings never influence the model.
    """
    samples = generate(split, n)
    if not extra:
        return samples
    seed = split_seed(split)
    core_families = ("held_out",) if held_out else ("paraphrase",)
    for sample in generate(split, extra):
        samples.append(reword(sample, random.Random(f"wording:{seed}:{sample.index}"), core_families))
    for qtype in EXTRA_TYPES:
        for index in range(extra):
            families = ("held_out",) if held_out and index % 2 else TRAIN_FAMILIES
            sample = make_extra_sample(seed, index, qtype, families=families, lang=LANGUAGES[(index // 2) % 2])
            sample.split, sample.index = split, index
            samples.append(sample)
    return samples


# ----------------------------------------------------------------------------------------------
# Scoring


def normalize_answer(text: str) -> str:
    """Canonical form for exact-match scoring: case, width, spacing and end punctuation ignored."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    text = text.strip().lower()
    text = re.sub(r"\s+", " ", text)
    text = text.strip(" \"'`“”‘’")
    return text.rstrip(" .。!！").strip()


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def vocabulary_corpus() -> list[str]:
    """The core types' base phrasings and answer forms, for training the demo tokenizer's merges.

    The committed checkpoint's tokenizer was built from exactly these lines, and a fine-tuned
    model keeps its checkpoint's tokenizer, so the extra types' wordings and the honest answer
    are not added here: they tokenize into the pieces these give (byte pieces for characters
    these lack), and a change here would change every tokenizer built from scratch.
    """
    lines: list[str] = []
    for (qtype, lang), templates in QUESTIONS.items():
        for template in templates:
            for shape in SHAPES:
                if lang == "zh":
                    lines.append(template.format(shape=SHAPE_ZH_NOUN[shape]))
                else:
                    lines.append(template.format(shape=shape, shapes=SHAPE_PLURAL[shape]))
    for shape in SHAPES:
        lines.append(f"It is a {shape}. 这是{SHAPE_ZH[shape]}。")
        for color in COLORS:
            lines.append(f"The {shape} is {color}. {SHAPE_ZH_NOUN[shape]}是{COLOR_ZH[color]}的。")
        for n in range(1, MAX_COUNT + 1):
            lines.append(f"{_count_answer(shape, n, 'en')} {_count_answer(shape, n, 'zh')}")
        for where in POSITIONS:
            lines.append(f"The {shape} is {POSITION_EN[where]}. {SHAPE_ZH_NOUN[shape]}在{POSITION_ZH[where]}。")
    for word in WORDS:
        lines.append(f"The word is {word}. 写的是{word}。")
    for digit in range(10):
        lines.append(f"The digit is {digit}. 写的是{digit}。")
    return lines


# The page's count sample shows at most this many objects: four and five are where the demo model
# miscounts (its card), and a first look should show what it does well.
WEB_SAMPLE_MAX_COUNT = 3


def web_samples(n: int = 6) -> list[VQASample]:
    """The held-out samples the chat page offers: one for each of the first `n` question types and
    languages of the test split, in order; each the first of its kind, except that a count shows at
    most WEB_SAMPLE_MAX_COUNT objects."""
    candidates = generate("test", 200)
    kinds: list[tuple[str, str]] = []
    for sample in candidates:
        if (sample.question_type, sample.lang) not in kinds:
            kinds.append((sample.question_type, sample.lang))
    picked: list[VQASample] = []
    for kind in kinds[:n]:
        picked.append(next(s for s in candidates if (s.question_type, s.lang) == kind
                           and (s.question_type != "count" or len(s.objects) <= WEB_SAMPLE_MAX_COUNT)))
    return picked


def write_web_samples(out_dir: str | Path, n: int = 6) -> list[dict[str, str]]:
    """A few held-out samples, one per question type and language, for the chat page to offer.

    Writes PNGs and `index.json` (the page's format: file, title, prompt) to `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, sample in enumerate(web_samples(n), 1):
        name = f"sample-{i}-{sample.question_type}-{sample.lang}.png"
        sample.image.save(out / name, optimize=True)
        index.append({"file": name, "title": f"{sample.question_type} ({sample.lang})", "prompt": sample.question})
    (out / "index.json").write_text(json.dumps({"samples": index}, ensure_ascii=False, indent=2) + "\n")
    return index
