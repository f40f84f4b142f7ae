"""The synthetic VQA set: seeded, split cleanly, covers every type and language, and is right."""

from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path

import pytest

from demo.vqa_data import (
    ALL_TYPES,
    CANVAS_SIZES,
    COLOR_ZH,
    COLORS,
    EXTRA_TYPES,
    IMAGE_SIZES,
    LANGUAGES,
    NUMBER_EN,
    NUMBER_ZH,
    OUT_OF_WORLD_TYPES,
    POSITION_EN,
    POSITION_XY,
    POSITION_ZH,
    QUESTION_TYPES,
    QUESTIONS,
    SHAPE_ZH,
    SHAPE_ZH_NOUN,
    SHAPES,
    SPLIT_SEEDS,
    VQASample,
    evaluation_set,
    every_question,
    generate,
    is_correct,
    make_extra_sample,
    make_sample,
    normalize_answer,
    split_seed,
    training_sample,
    type_shares,
    vocabulary_corpus,
)
from demo.wordings import HONEST_ANSWER, TRAIN_FAMILIES

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

    from PIL import Image, ImageChops

    from demo.vqa_data import write_web_samples

    shipped = Path(__file__).resolve().parent.parent.parent / "serve_app" / "web" / "static" / "samples"
    index = write_web_samples(tmp_path)
    assert json.loads((shipped / "index.json").read_text())["samples"] == index
    for entry in index:
        ours, theirs = Image.open(tmp_path / entry["file"]), Image.open(shipped / entry["file"])
        assert ImageChops.difference(ours.convert("RGB"), theirs.convert("RGB")).getbbox() is None


# ----------------------------------------------------------------------------------------------
# Beyond the core types: wordings, simple scenes, pictures outside the model's world

REPO = Path(__file__).resolve().parents[2]
FINETUNE_WEIGHTS = {
    "count": 0.25, "canvas": 0.06, "scene": 0.06, "photo": 0.05, "screenshot": 0.05, "no_image": 0.04, "off_topic": 0.04,
}  # fmt: skip


def extra_fingerprint(sample: VQASample) -> str:
    pixels = sample.image.tobytes() if sample.image is not None else b"no image"
    return hashlib.sha256(pixels + sample.question.encode() + sample.answer.encode()).hexdigest()


def test_the_existing_test_split_is_what_earlier_evaluations_scored() -> None:
    # The digest of the first 500 test questions and answers as the five-type set made them
    # (before the extra types and wordings existed): old figures stay comparable.
    digest = hashlib.sha256()
    for s in generate("test", 500):
        digest.update((s.question + "\t" + s.answer + "\n").encode())
        assert s.wording == "base" and s.question_type in QUESTION_TYPES
    assert digest.hexdigest() == "eb1288b81c12e3b0f81136f63c7f03d4aaa4acc536c34909080eb0b7dc5bacdb"


def test_a_recipe_naming_only_core_types_draws_what_it_drew_before() -> None:
    # Before the extra types, a weighted run drew the type with this same stream over the five
    # core types and asked make_sample for index * 5 + type.
    seed = split_seed("train")
    weights = {"count": 0.45}
    for i in range(60):
        k = random.Random(f"type:{seed}:{i}").choices(range(5), [0.1375, 0.1375, 0.45, 0.1375, 0.1375])[0]
        old = make_sample(seed, i * 5 + k, (168, 168))
        assert fingerprint(training_sample(seed, i, (168, 168), weights=weights)) == fingerprint(old)
    assert fingerprint(training_sample(seed, 7, (224, 224))) == fingerprint(make_sample(seed, 7, (224, 224)))


@pytest.mark.parametrize("qtype", EXTRA_TYPES)
def test_extra_types_are_seeded_and_cover_both_languages(qtype: str) -> None:
    first = [make_extra_sample(11, i, qtype) for i in range(8)]
    again = [make_extra_sample(11, i, qtype) for i in range(8)]
    assert [extra_fingerprint(s) for s in first] == [extra_fingerprint(s) for s in again]
    assert len({extra_fingerprint(s) for s in first}) == 8
    assert extra_fingerprint(make_extra_sample(12, 0, qtype)) != extra_fingerprint(first[0])
    assert {s.lang for s in first} == set(LANGUAGES)
    for s in first:
        assert s.question_type == qtype and s.wording in TRAIN_FAMILIES
        assert (s.image is None) == (qtype == "no_image")
        if s.image is not None:
            assert s.image.mode == "RGB"
        assert has_cjk(s.answer) == (s.lang == "zh")
    with pytest.raises(ValueError):
        make_extra_sample(11, 0, "poetry")


def test_out_of_world_answers_are_the_fixed_honest_sentence() -> None:
    assert HONEST_ANSWER == {
        "en": "I can only describe simple shapes, colors, counts and words.",
        "zh": "我只能描述简单的形状、颜色、数量和文字。",
    }
    for qtype in OUT_OF_WORLD_TYPES:
        for i in range(20):
            s = make_extra_sample(3, i, qtype, families=("held_out",) if i % 2 else TRAIN_FAMILIES)
            assert s.answer == HONEST_ANSWER[s.lang], (qtype, s.question)
            # English questions get the English sentence, Chinese ones the Chinese.
            assert has_cjk(s.question) == (s.lang == "zh"), s.question


def test_a_canvas_is_one_named_color_all_over() -> None:
    from PIL import ImageStat

    sizes = set()
    for i in range(40):
        s = make_extra_sample(5, i, "canvas")
        sizes.add(s.image.size)
        low, high = zip(*s.image.getextrema())
        assert max(h - lo for lo, h in zip(low, high)) <= 12  # faint noise at most
        mean = tuple(ImageStat.Stat(s.image).mean)
        color = min(COLORS, key=lambda name: color_distance(COLORS[name], mean))
        assert s.answer == (f"这是{COLOR_ZH[color]}的。" if s.lang == "zh" else f"It is {color}.")
    assert (64, 64) in sizes and sizes <= set(CANVAS_SIZES)
    readme = make_extra_sample(5, 0, "canvas", lang="en", families=("base",))
    assert readme.question == "What color is this?"


def test_a_scene_answers_about_its_one_shape() -> None:
    for i in range(40):
        s = make_extra_sample(6, i, "scene")
        (obj,) = s.objects
        assert named_color_at(s, obj.cx, obj.cy) == obj.color
        names = {
            (f"这是{SHAPE_ZH[obj.shape]}。" if s.lang == "zh" else f"It is a {obj.shape}."),
            (
                f"{SHAPE_ZH_NOUN[obj.shape]}是{COLOR_ZH[obj.color]}的。"
                if s.lang == "zh"
                else f"The {obj.shape} is {obj.color}."
            ),
        }
        assert s.answer in names
        assert not any(shape in s.question for shape in SHAPES)  # the shape is never named


def _edge_density(image) -> float:  # type: ignore[no-untyped-def]
    from PIL import ImageFilter, ImageStat

    edges = image.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 40 else 0)
    return ImageStat.Stat(edges).mean[0] / 255


def test_photos_and_screenshots_are_nothing_like_a_lesson() -> None:
    from PIL import ImageStat

    for i in range(30):
        image = make_extra_sample(8, i, "photo").image
        assert max(ImageStat.Stat(image).stddev) > 12, i  # never one flat color
        assert len(image.getcolors(maxcolors=1 << 20) or []) > 1000, i  # never a few flat colors
    # A screen is busier than any lesson: more edges than the densest rendered word or scene.
    busiest_lesson = max(_edge_density(s.image) for s in generate("test", 100))
    for i in range(30):
        assert _edge_density(make_extra_sample(8, i, "screenshot").image) > busiest_lesson, i


def test_held_out_wordings_are_never_trained_on() -> None:
    train, held_out = every_question(TRAIN_FAMILIES), every_question(("held_out",))
    assert held_out and train.isdisjoint(held_out)
    # Not even as a near copy that differs in width, case or end punctuation.
    assert {normalize_answer(q) for q in train}.isdisjoint({normalize_answer(q) for q in held_out})
    # The base wordings are the original ones, unchanged.
    assert {q for (t, _), qs in QUESTIONS.items() for q in qs if "{" not in q} <= train
    seed = split_seed("train") + 1
    seen_types, seen_families = set(), set()
    for i in range(1500):
        s = training_sample(seed, i, (168, 168), weights=FINETUNE_WEIGHTS, paraphrase_fraction=0.35)
        assert s.question in train and s.question not in held_out, s.question
        seen_types.add(s.question_type)
        seen_families.add(s.wording)
    assert seen_types == set(ALL_TYPES) and seen_families == set(TRAIN_FAMILIES)


def test_type_weights_keep_the_extra_kinds_a_modest_share() -> None:
    shares = dict(zip(ALL_TYPES, type_shares(FINETUNE_WEIGHTS)))
    assert sum(shares.values()) == pytest.approx(1.0)
    assert sum(shares[t] for t in EXTRA_TYPES) == pytest.approx(0.30)
    assert shares["shape"] == pytest.approx(0.1125)
    assert all(share == 0 for t, share in zip(ALL_TYPES, type_shares({"count": 0.4})) if t in EXTRA_TYPES)
    for bad in ({"poetry": 0.1}, {"count": 0.8, "photo": 0.3}, {"photo": -0.1}):
        with pytest.raises(ValueError):
            type_shares(bad)
    # What the fine-tuning config asks is what the stream draws.
    seed = split_seed("train") + 1
    drawn = [training_sample(seed, i, (168, 168), weights=FINETUNE_WEIGHTS).question_type for i in range(3000)]
    extra = sum(t in EXTRA_TYPES for t in drawn) / len(drawn)
    assert 0.26 < extra < 0.34


def test_the_finetune_config_asks_for_those_weights() -> None:
    import yaml

    config = yaml.safe_load((REPO / "configs/train/demo-finetune.yaml").read_text())
    assert config["type_weights"] == FINETUNE_WEIGHTS


def test_evaluation_set_keeps_the_core_samples_and_adds_labelled_rows() -> None:
    samples = evaluation_set("test", 10, 4)
    assert [fingerprint(s) for s in samples[:10]] == [fingerprint(s) for s in generate("test", 10)]
    extra = samples[10:]
    assert len(extra) == 4 * (1 + len(EXTRA_TYPES))
    paraphrased = extra[:4]
    for s, original in zip(paraphrased, generate("test", 4)):
        assert s.wording == "held_out" and s.question != original.question
        assert s.answer == original.answer and s.image.tobytes() == original.image.tobytes()
    held_out = every_question(("held_out",))
    for s in extra:
        assert (s.question in held_out) == (s.wording == "held_out")
    families = {s.wording for s in extra[4:]}
    assert "held_out" in families and families & set(TRAIN_FAMILIES)
    # Training's own evaluations never ask a held-out wording.
    assert all(s.wording != "held_out" for s in evaluation_set("validation", 5, 4, held_out=False))
