"""The model stage's engine on CPU with the demo checkpoint: prompts, batching, sampling, stops."""

from __future__ import annotations

import copy
import logging

import pytest
from PIL import Image
from transformers import AutoImageProcessor

from demo.model import make_demo_model
from engine.generate.engine import Engine, _Detokenizer
from engine.prompts import Prompter
from serve_app.settings import ModelSettings
from serve_app.stage_types import (
    GenerationRequest,
    ImagePart,
    PreprocessedImage,
    PromptMessage,
    SamplingParams,
    TextPart,
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = make_demo_model(tmp_path_factory.mktemp("demo") / "ckpt")
    return Engine.load(ModelSettings(id="demo", path=str(path), max_model_len=512))


def preprocessed(engine: Engine, size: tuple[int, int], color: tuple[int, int, int]) -> PreprocessedImage:
    processor = AutoImageProcessor.from_pretrained(engine.settings.path)
    features = processor(images=[Image.new("RGB", size, color)], return_tensors="pt")
    t, h, w = (int(v) for v in features["image_grid_thw"][0])
    return PreprocessedImage(features["pixel_values"], (t, h, w), *size, tokens=t * h * w // 4)


def user_request(engine: Engine, text: str, image: PreprocessedImage | None, **sampling) -> GenerationRequest:
    parts = (TextPart(text),) if image is None else (ImagePart(), TextPart(text))
    params = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **sampling})
    return GenerationRequest([PromptMessage("user", parts)], [image] if image else [], params)


def run(engine: Engine, requests: list[GenerationRequest]) -> list[tuple[str, str, int]]:
    prepared = [engine.prepare(r) for r in requests]
    texts = [""] * len(prepared)
    finals: list = [None] * len(prepared)

    def on_step(chunks) -> None:
        for i, chunk in enumerate(chunks):
            if chunk is not None:
                assert finals[i] is None, "a row emitted after it finished"
                texts[i] += chunk.text
                if chunk.finish_reason:
                    finals[i] = chunk

    engine.generate_batch(prepared, on_step)
    return [(t, f.finish_reason, f.completion_tokens) for t, f in zip(texts, finals)]


def test_prompt_follows_glm_chat_format(engine: Engine) -> None:
    image = preprocessed(engine, (56, 56), (255, 0, 0))
    request = GenerationRequest(
        [PromptMessage("system", (TextPart("Be brief."),)), PromptMessage("user", (ImagePart(), TextPart("Shape?")))],
        [image], SamplingParams(max_tokens=4),
    )
    prompt = engine.render_prompt(request)
    assert prompt == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Shape?/nothink"
        "<|assistant|>\n<think></think>\n"
    )
    prepared = engine.prepare(request)
    image_token = engine.tokenizer.convert_tokens_to_ids(engine.prompter.image_token)
    assert prepared.input_ids.count(image_token) == 4  # 56x56 -> 4x4 patches -> 2x2 merged


def test_thinking_is_switched_off_only_in_templates_that_take_the_switch(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    request = user_request(engine, "Shape?", None)
    with caplog.at_level(logging.WARNING):
        engine.render_prompt(request)  # the demo template never thinks: no switch, no warning per request
    assert not [r for r in caplog.records if "processor_kwargs" in r.getMessage()]

    thinking = copy.copy(engine.processor)  # GLM-4.6V's own template thinks unless told otherwise
    thinking.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content[0].text }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}/nothink{% else %}<think>{% endif %}"
    )
    assert Prompter(engine.settings, thinking).render(request) == "<|user|>Shape?/nothink"


def test_greedy_batch_matches_plain_generate_alone(engine: Engine) -> None:
    requests = [
        user_request(engine, "What shape is this?", preprocessed(engine, (224, 224), (255, 0, 0))),
        user_request(engine, "How many circles?", preprocessed(engine, (100, 300), (0, 255, 0)), max_tokens=5),
        user_request(engine, "Say hello.", None, max_tokens=9),
    ]
    batched = run(engine, requests)
    for request, (text, reason, count) in zip(requests, batched):
        prepared = engine.prepare(request)
        inputs = engine._collate([prepared])
        out = engine.model.generate(**inputs, max_new_tokens=prepared.max_tokens, do_sample=False,
                                    eos_token_id=sorted(engine.eos_token_ids), pad_token_id=engine.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        new = [t for t in new if t not in engine.eos_token_ids]
        # A character cut in half by max_tokens is dropped rather than sent as U+FFFD.
        assert text == engine.tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd")
        assert count == len(new)
        assert reason == ("length" if count == prepared.max_tokens else "stop")


def test_seeded_sampling_is_repeatable_and_independent_of_batch(engine: Engine) -> None:
    sampled = user_request(engine, "Tell me.", None, temperature=1.0, top_p=0.9, seed=42, max_tokens=10)
    alone = run(engine, [sampled])[0]
    with_neighbour = run(engine, [user_request(engine, "Other.", None, temperature=0.7, seed=1), sampled])[1]
    assert alone == with_neighbour


def test_ignore_eos_and_min_tokens_force_the_length(engine: Engine) -> None:
    (text, reason, count), = run(engine, [user_request(engine, "Hi", None, max_tokens=20, ignore_eos=True)])
    assert (reason, count) == ("length", 20)


def test_context_window_is_enforced(engine: Engine) -> None:
    from serve_app.errors import ContextLengthError

    with pytest.raises(ContextLengthError):
        engine.prepare(user_request(engine, "word " * 600, None))
    with pytest.raises(ContextLengthError):
        engine.prepare(user_request(engine, "hi", None, max_tokens=10_000))


class FakeTokenizer:
    """Decodes token ids as characters, so stop handling is tested apart from any vocabulary."""

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) for t in tokens)


def feed(detokenizer: _Detokenizer, text: str) -> tuple[str, bool]:
    out = ""
    for ch in text:
        delta, stopped = detokenizer.add(ord(ch))
        out += delta
        if stopped:
            return out, True
    return out + detokenizer.flush(), False


def test_stop_sequences_are_cut_and_never_leak() -> None:
    assert feed(_Detokenizer(FakeTokenizer(), ("END",)), "hello ENDworld") == ("hello ", True)
    assert feed(_Detokenizer(FakeTokenizer(), ("END",)), "hello EN") == ("hello EN", False)
    detok = _Detokenizer(FakeTokenizer(), ("\n\n",))
    assert detok.add(ord("a")) == ("a", False)
    assert detok.add(ord("\n")) == ("", False)  # might begin the stop sequence: held back
    assert detok.add(ord("b")) == ("\nb", False)


def test_piecewise_detokenizing_gives_the_same_text_as_decoding_everything(engine: Engine) -> None:
    """Byte-level tokenizers are decoded incrementally (only what follows the last whole character);
    the deltas must add up to exactly what decoding the whole list gives, at every step."""
    import random

    tokenizer = engine.tokenizer
    assert _Detokenizer(tokenizer, ())._piecewise
    rng = random.Random(7)
    vocab = len(tokenizer)
    # Chinese answers split characters across byte tokens; special tokens are skipped in the text.
    pieces = tokenizer("图中的六边形是红色的 star, 圆形?", add_special_tokens=False)["input_ids"]
    for trial in range(40):
        tokens = [rng.choice(pieces) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
        detok = _Detokenizer(tokenizer, ())
        emitted = ""
        for i, token in enumerate(tokens):
            delta, _ = detok.add(token)
            emitted += delta
            whole = tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
            assert whole.startswith(emitted), (trial, i)
        assert emitted + detok.flush() == tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
