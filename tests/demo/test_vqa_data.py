"""The synthetic VQA set: seeded, split cleanly, covers every type and language, and is right."""

from __future__ import annotations

import hashlib
import math
import re

import pytest

from demo.vqa_data import (
    COLOR_ZH,
    COLORS,
    IMAGE_SIZES,
    LANGUAGES,
    NUMBER_EN,
    NUMBER_ZH,
    POSITION_EN,
    POSITION_XY,
    POSITION_ZH,
    QUESTION_TYPES,
    SHAPE_ZH,
    SHAPE_ZH_NOUN,
    SHAPES,
    SPLIT_SEEDS,
    VQASample,
    generate,
    is_correct,
    make_sample,
    normalize_answer,
    vocabulary_corpus,
)

N = 100  # 10 of each (type, language) pair


def fingerprint(sample: VQASample) -> str:
    return hashlib.sha256(sample.image.tobytes() + sample.question.encode() + sample.answer.encode()).hexdigest()


def test_same_seed_same_samples() -> None:
    assert [fingerprint(s) for s in generate("test", 30)] == [fingerprint(s) for s in generate("test", 30)]
    assert fingerprint(make_sample(7, 3)) == fingerprint(make_sample(7, 3))
    assert fingerprint(make_sample(7, 3)) != fingerprint(make_sample(8, 3))


def test_splits_use_distinct_seeds_and_share_no_sample() -> None:
    assert len(set(SPLIT_SEEDS.values())) == len(SPLIT_SEEDS)
    prints = {split: {fingerprint(s) for s in generate(split, N)} for split in SPLIT_SEEDS}
    assert prints["train"].isdisjoint(prints["validation"])
    assert prints["train"].isdisjoint(prints["test"])
    assert prints["validation"].isdisjoint(prints["test"])
    with pytest.raises(ValueError):
        generate("holdout", 1)


def test_every_question_type_and_language_is_present() -> None:
    samples = generate("test", N)
    pairs = {(s.question_type, s.lang) for s in samples}
    assert pairs == {(t, lang) for t in QUESTION_TYPES for lang in LANGUAGES}
    assert len({s.question for s in samples if s.question_type == "count"}) > 3  # several phrasings


def test_images_are_small_rgb_and_sized_from_the_menu() -> None:
    for s in generate("validation", 40):
        assert s.image.mode == "RGB"
        assert s.image.size in IMAGE_SIZES
        assert max(s.image.size) <= 224


def has_cjk(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


def test_chinese_questions_get_chinese_answers() -> None:
    for s in generate("test", N):
        assert has_cjk(s.question) == (s.lang == "zh")
        assert has_cjk(s.answer) == (s.lang == "zh")
        assert s.answer.endswith("。" if s.lang == "zh" else ".")


def color_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return math.dist(a, b)


def named_color_at(sample: VQASample, x: float, y: float) -> str:
    """The palette name nearest to the pixel at (x, y) of the drawn image."""
    pixel = sample.image.getpixel((int(x), int(y)))
    return min(COLORS, key=lambda name: color_distance(COLORS[name], pixel))


def expected_answer(sample: VQASample) -> str:
    """Recompute the answer from what was drawn (objects and pixels), independently of the generator."""
    zh = sample.lang == "zh"
    if sample.question_type == "shape":
        (obj,) = sample.objects
        return f"这是{SHAPE_ZH[obj.shape]}。" if zh else f"It is a {obj.shape}."
    if sample.question_type == "color":
        asked = [o for o in sample.objects if (SHAPE_ZH_NOUN[o.shape] if zh else o.shape) in sample.question]
        (target,) = asked  # shapes in a color scene are distinct, so the question names one
        color = named_color_at(sample, target.cx, target.cy)
        assert color == target.color
        return f"{SHAPE_ZH_NOUN[target.shape]}是{COLOR_ZH[color]}的。" if zh else f"The {target.shape} is {color}."
    if sample.question_type == "count":
        names = {s: (SHAPE_ZH_NOUN[s] if zh else s + "s") for s in SHAPES}
        (target,) = [s for s, name in names.items() if name in sample.question]
        n = sum(o.shape == target for o in sample.objects)
        if zh:
            return f"图里有{NUMBER_ZH[n]}个{SHAPE_ZH_NOUN[target]}。"
        return f"There is one {target}." if n == 1 else f"There are {NUMBER_EN[n]} {target}s."
    if sample.question_type == "position":
        (obj,) = sample.objects
        w, h = sample.image.size
        where = min(
            POSITION_XY, key=lambda p: math.dist((POSITION_XY[p][0] * w, POSITION_XY[p][1] * h), (obj.cx, obj.cy))
        )
        if zh:
            return f"{SHAPE_ZH_NOUN[obj.shape]}在{POSITION_ZH[where]}。"
        return f"The {obj.shape} is {POSITION_EN[where]}."
    assert sample.question_type == "text" and sample.text
    if zh:
        return f"写的是{sample.text}。"
    return f"The word is {sample.text}." if sample.text.isalpha() else f"The digit is {sample.text}."


def test_answers_match_the_drawn_scene() -> None:
    for s in generate("test", 200):
        assert s.answer == expected_answer(s), (s.question, s.answer)
        if s.question_type in ("shape", "position"):
            (obj,) = s.objects
            assert named_color_at(s, obj.cx, obj.cy) == obj.color


def test_objects_do_not_overlap_and_stay_inside() -> None:
    for s in generate("train", 200):
        w, h = s.image.size
        for i, a in enumerate(s.objects):
            assert a.radius <= a.cx <= w - a.radius and a.radius <= a.cy <= h - a.radius
            for b in s.objects[i + 1 :]:
                assert math.dist((a.cx, a.cy), (b.cx, b.cy)) > a.radius + b.radius


def test_text_is_actually_drawn() -> None:
    for s in generate("test", 50):
        if s.question_type == "text":
            colors = s.image.getcolors(maxcolors=1 << 16) or []
            assert len(colors) > 2  # background plus anti-aliased glyphs


def test_normalize_answer() -> None:
    assert normalize_answer("  The Circle is RED. ") == "the circle is red"
    assert normalize_answer("圆是红色的。") == normalize_answer("圆是红色的")
    assert normalize_answer("写的是ＣＡＴ！") == "写的是cat"  # full-width letters and marks
    assert normalize_answer("<think>hmm</think>It is a star.") == "it is a star"
    assert normalize_answer('"There are  two squares."') == "there are two squares"
    assert is_correct("there are two squares", "There are two squares.")
    assert not is_correct("There are three squares.", "There are two squares.")


def test_demo_tokenizer_keeps_prompts_compact() -> None:
    from demo.model import build_tokenizer

    tokenizer = build_tokenizer()
    for line in vocabulary_corpus()[:400]:
        assert len(tokenizer(line, add_special_tokens=False)["input_ids"]) <= 16, line
    for s in generate("test", 50):
        assert len(tokenizer(s.answer, add_special_tokens=False)["input_ids"]) <= 8, s.answer


def test_the_pages_sample_images_are_the_generators(tmp_path) -> None:
    """serve_app/web/static/samples is what write_web_samples makes (regenerate it after changing the set)."""
    import json
    from pathlib import Path

    from PIL import Image, ImageChops

    from demo.vqa_data import write_web_samples

    shipped = Path(__file__).resolve().parent.parent.parent / "serve_app" / "web" / "static" / "samples"
    index = write_web_samples(tmp_path)
    assert json.loads((shipped / "index.json").read_text())["samples"] == index
    for entry in index:
        ours, theirs = Image.open(tmp_path / entry["file"]), Image.open(shipped / entry["file"])
        assert ImageChops.difference(ours.convert("RGB"), theirs.convert("RGB")).getbbox() is None
