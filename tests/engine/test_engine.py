"""The generate() engine on CPU with the demo checkpoint: prompts, batching, sampling, stops, and a
row whose sampling fails failing alone."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from demo.model import make_demo_model
from engine.detokenizer import Detokenizer
from engine.generate.engine import GenerateEngine
from engine.loader import load_model
from engine.prompts import Prompter
from engine.protocol import Engine
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
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerateEngine]:
    path = make_demo_model(tmp_path_factory.mktemp("demo") / "ckpt")
    made = GenerateEngine(load_model(ModelSettings(id="demo", path=str(path), max_model_len=512)))
    yield made
    made.close()


def preprocessed(engine: Engine, size: tuple[int, int], color: tuple[int, int, int]) -> PreprocessedImage:
    processor = AutoImageProcessor.from_pretrained(engine.settings.path)
    features = processor(images=[Image.new("RGB", size, color)], return_tensors="pt")
    t, h, w = (int(v) for v in features["image_grid_thw"][0])
    return PreprocessedImage(features["pixel_values"], (t, h, w), *size, tokens=t * h * w // 4)


def user_request(engine: Engine, text: str, image: PreprocessedImage | None, **sampling) -> GenerationRequest:
    parts = (TextPart(text),) if image is None else (ImagePart(), TextPart(text))
    params = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **sampling})
    return GenerationRequest([PromptMessage("user", parts)], [image] if image else [], params)


def run(engine: Engine, requests: list[GenerationRequest]) -> list:
    """Each request's (text, finish_reason, completion_tokens) through one batch of `engine`, or the
    exception its stream got."""
    prepared = [engine.prepare(r) for r in requests]
    texts = [""] * len(prepared)
    finals: list = [None] * len(prepared)

    def on_step(entries) -> None:
        for i, entry in enumerate(entries):
            if entry is not None:
                assert finals[i] is None, "a row emitted after it finished"
                if isinstance(entry, BaseException):
                    finals[i] = entry
                    continue
                texts[i] += entry.text
                if entry.finish_reason:
                    finals[i] = entry

    engine.generate_batch(prepared, on_step)
    return [f if isinstance(f, BaseException) else (t, f.finish_reason, f.completion_tokens)
            for t, f in zip(texts, finals)]


@torch.inference_mode()
def plain_generate(engine, prepared, **generation) -> list[int]:
    """`model.generate()` alone on one request (greedy unless `generation` says otherwise), end-of-sequence
    tokens left out: what an engine's row must reproduce."""
    loaded = engine.loaded
    inputs = loaded.collate([prepared])
    out = loaded.model.generate(**inputs, max_new_tokens=prepared.max_tokens, do_sample=False,
                                eos_token_id=sorted(loaded.eos_token_ids), pad_token_id=loaded.pad_token_id,
                                **generation)
    return [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in loaded.eos_token_ids]


def test_prompt_follows_glm_chat_format(engine: Engine) -> None:
    image = preprocessed(engine, (56, 56), (255, 0, 0))
    request = GenerationRequest(
        [PromptMessage("system", (TextPart("Be brief."),)), PromptMessage("user", (ImagePart(), TextPart("Shape?")))],
        [image], SamplingParams(max_tokens=4),
    )
    prompt = engine.prompter.render(request)
    assert prompt == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Shape?/nothink"
        "<|assistant|>\n<think></think>\n"
    )
    prepared = engine.prepare(request)
    image_token = engine.loaded.tokenizer.convert_tokens_to_ids(engine.prompter.image_token)
    assert prepared.input_ids.count(image_token) == 4  # 56x56 -> 4x4 patches -> 2x2 merged


def test_thinking_is_switched_off_only_in_templates_that_take_the_switch(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    request = user_request(engine, "Shape?", None)
    with caplog.at_level(logging.WARNING):
        engine.prompter.render(request)  # the demo template never thinks: no switch, no warning per request
    assert not [r for r in caplog.records if "processor_kwargs" in r.getMessage()]

    thinking = copy.copy(engine.loaded.processor)  # GLM-4.6V's own template thinks unless told otherwise
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
        new = plain_generate(engine, prepared)
        # A character cut in half by max_tokens is dropped rather than sent as U+FFFD.
        assert text == engine.loaded.tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd")
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


def feed(detokenizer: Detokenizer, text: str) -> tuple[str, bool]:
    out = ""
    for ch in text:
        delta, stopped = detokenizer.add(ord(ch))
        out += delta
        if stopped:
            return out, True
    return out + detokenizer.flush(), False


def test_stop_sequences_are_cut_and_never_leak() -> None:
    assert feed(Detokenizer(FakeTokenizer(), ("END",)), "hello ENDworld") == ("hello ", True)
    assert feed(Detokenizer(FakeTokenizer(), ("END",)), "hello EN") == ("hello EN", False)
    detok = Detokenizer(FakeTokenizer(), ("\n\n",))
    assert detok.add(ord("a")) == ("a", False)
    assert detok.add(ord("\n")) == ("", False)  # might begin the stop sequence: held back
    assert detok.add(ord("b")) == ("\nb", False)


def test_piecewise_detokenizing_gives_the_same_text_as_decoding_everything(engine: Engine) -> None:
    """Byte-level tokenizers are decoded incrementally (only what follows the last whole character);
    the deltas must add up to exactly what decoding the whole list gives, at every step."""
    import random

    tokenizer = engine.loaded.tokenizer
    assert Detokenizer(tokenizer, ()).piecewise
    rng = random.Random(7)
    vocab = len(tokenizer)
    # Chinese answers split characters across byte tokens; special tokens are skipped in the text.
    pieces = tokenizer("图中的六边形是红色的 star, 圆形?", add_special_tokens=False)["input_ids"]
    for trial in range(40):
        tokens = [rng.choice(pieces) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
        detok = Detokenizer(tokenizer, ())
        emitted = ""
        for i, token in enumerate(tokens):
            delta, _ = detok.add(token)
            emitted += delta
            whole = tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
            assert whole.startswith(emitted), (trial, i)
        assert emitted + detok.flush() == tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


# ---- per-row sampling: failures stay in their row, top_k, repetition penalty -----------------------


def test_a_row_whose_sampling_fails_fails_alone_and_the_batch_goes_on(engine: GenerateEngine) -> None:
    """A seed torch cannot take fails its own row (its stream gets the error); its neighbours give what
    they give alone."""
    neighbours = [user_request(engine, "What shape is this?", preprocessed(engine, (56, 56), (255, 0, 0))),
                  user_request(engine, "Tell me.", None, temperature=1.0, seed=7, max_tokens=10)]
    alone = [run(engine, [r])[0] for r in neighbours]
    bad_seed = user_request(engine, "Hi", None, temperature=1.0, seed=2**64, max_tokens=10)
    got = run(engine, [neighbours[0], bad_seed, neighbours[1]])
    assert isinstance(got[1], Exception) and "Overflow" in str(got[1]), got[1]
    assert [got[0], got[2]] == alone
    assert run(engine, neighbours) == alone  # and the engine serves on


def test_a_temperature_too_small_to_divide_by_gives_the_greedy_answer(engine: GenerateEngine) -> None:
    greedy = user_request(engine, "Describe.", preprocessed(engine, (112, 112), (0, 0, 200)), max_tokens=20)
    tiny = user_request(engine, "Describe.", preprocessed(engine, (112, 112), (0, 0, 200)), max_tokens=20,
                        temperature=1e-45, seed=1)
    assert run(engine, [tiny, greedy]) == run(engine, [greedy]) * 2


def test_top_k_keeps_the_k_most_likely_tokens() -> None:
    from engine.generate.sampling import sample

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -9.0])
    generator = torch.Generator().manual_seed(0)

    def draws(**params) -> torch.Tensor:
        p = SamplingParams(max_tokens=1, **params)
        return torch.stack([sample(logits, p, generator) for _ in range(3000)])

    two = draws(temperature=1.0, top_k=2)
    assert set(two.tolist()) == {0, 1}
    frequencies = torch.bincount(two, minlength=5).float() / len(two)
    assert torch.allclose(frequencies[:2], torch.softmax(logits[:2], -1), atol=0.03), frequencies  # renormalised
    assert set(draws(temperature=1.0, top_k=0).tolist()) >= {0, 1, 2, 3}  # 0: off
    # top_p reads what top_k kept, renormalised: of the first three, token 0 alone has 0.665 >= 0.66 (of all
    # five it would have 0.644, and token 1 would join it).
    assert set(draws(temperature=1.0, top_k=3, top_p=0.66).tolist()) == {0}


def test_top_k_one_samples_the_greedy_answer(engine: GenerateEngine) -> None:
    image = preprocessed(engine, (84, 84), (10, 200, 10))
    greedy = user_request(engine, "Tell me about it.", image, max_tokens=24, ignore_eos=True)
    hot = user_request(engine, "Tell me about it.", image, max_tokens=24, ignore_eos=True, temperature=1.5, seed=3)
    assert run(engine, [hot]) != run(engine, [greedy])  # a hot sample leaves the greedy path...
    top1 = user_request(engine, "Tell me about it.", image, max_tokens=24, ignore_eos=True, temperature=1.5, seed=3,
                        top_k=1)
    assert run(engine, [top1]) == run(engine, [greedy])  # ...unless only the best token may be drawn


def test_repetition_penalty_is_transformers_own(engine: GenerateEngine) -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    from engine.generate.sampling import penalize

    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    seen = torch.tensor([3, 7, 7, 11, 49])
    expected = RepetitionPenaltyLogitsProcessor(1.4)(seen[None], logits[None].clone())[0]
    assert torch.equal(penalize(logits, seen, 1.4), expected)
    assert torch.equal(penalize(logits, seen, 1.0), logits)

    # Served: a greedy row with a penalty gives what generate(repetition_penalty=...) gives alone, over
    # the prompt's tokens and its own, and a different answer than without it.
    request = user_request(engine, "Tell me about the picture.", preprocessed(engine, (112, 112), (200, 30, 30)),
                           max_tokens=40, ignore_eos=True)
    penalized = user_request(engine, "Tell me about the picture.", preprocessed(engine, (112, 112), (200, 30, 30)),
                             max_tokens=40, ignore_eos=True, repetition_penalty=1.3)
    expected_ids = plain_generate(engine, engine.prepare(penalized), repetition_penalty=1.3,
                                  suppress_tokens=sorted(engine.loaded.eos_token_ids))
    (text, reason, count), plain = run(engine, [penalized, request])
    assert text == engine.loaded.tokenizer.decode(expected_ids, skip_special_tokens=True).rstrip("\ufffd")
    assert (reason, count) == ("length", 40)
    assert text != plain[0]
