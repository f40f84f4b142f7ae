"""Prefix and encoder caching in the continuous engine, on the tiny GLM-4V model in float32 on CPU:
a conversation turn after turn (adding text, adding an image, edited in the middle) gives token for
token what an engine with both caches off gives, while prefilling only what follows its cached
prefix and running the vision encoder only on images no cache holds; different images and
different cache salts never share blocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.continuous.engine import ContinuousEngine
from serve_app.stage_types import (
    GenerationChunk,
    GenerationRequest,
    ImagePart,
    PreprocessedImage,
    PromptMessage,
    SamplingParams,
    TextPart,
)
from tests.engine.test_continuous_engine import chunks_of, continuous, record_detokenizers
from tests.engine.test_engine import preprocessed

# Small blocks, so prefixes end close to where prompts diverge, and a small prefill budget, so cached
# prompts go on in chunks too; the engine without caches prefills each prompt whole.
OPTIONS = {"max_slots": 4, "block_size": 4, "min_length_bucket": 16}


@pytest.fixture(scope="module")
def uncached(engine) -> Iterator[ContinuousEngine]:
    made = continuous(engine, **OPTIONS, prefix_caching=False, encoder_cache_bytes=0)
    yield made
    made.close()


@pytest.fixture
def cached(engine) -> Iterator[ContinuousEngine]:
    """An engine with both caches on (the defaults), empty at the start of each test."""
    made = continuous(engine, **OPTIONS, max_prefill_tokens=24)
    yield made
    made.close()


@pytest.fixture
def encoded(cached, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many images each pass of `cached`'s vision encoder encodes."""
    passes: list[int] = []
    original = cached.runner.decoder.encode_images

    def counting(pixels, grid):
        passes.append(len(grid))
        return original(pixels, grid)

    monkeypatch.setattr(cached.runner.decoder, "encode_images", counting)
    return passes


def user(*parts) -> PromptMessage:
    return PromptMessage("user", tuple(TextPart(p) if isinstance(p, str) else ImagePart() for p in parts))


def request(messages: list[PromptMessage], images: list[PreprocessedImage], salt: str | None = None,
            max_tokens: int = 10) -> GenerationRequest:
    return GenerationRequest(messages, images, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                             cache_salt=salt)


def generate(eng: ContinuousEngine, monkeypatch: pytest.MonkeyPatch,
             *requests: GenerationRequest) -> list[tuple[list[int], GenerationChunk, str]]:
    """Each request's token ids, last chunk and text, all submitted as one batch."""
    made = record_detokenizers(eng, monkeypatch)
    got = chunks_of(eng, [eng.prepare(r) for r in requests])
    return [(d.tokens, chunks[-1], "".join(c.text for c in chunks)) for d, chunks in zip(made, got)]


@pytest.fixture(scope="module")
def pictures(engine) -> dict[str, PreprocessedImage]:
    return {"red": preprocessed(engine, (112, 112), (255, 0, 0)), "blue": preprocessed(engine, (84, 140), (0, 0, 255)),
            "green": preprocessed(engine, (112, 112), (0, 200, 0))}


class Conversation:
    """A chat whose answers come from the engine without caches (the reference every turn is held to)."""

    def __init__(self, uncached: ContinuousEngine, monkeypatch: pytest.MonkeyPatch, first: PromptMessage,
                 images: list[PreprocessedImage]) -> None:
        self.uncached, self.monkeypatch = uncached, monkeypatch
        self.messages, self.images = [first], list(images)
        self.expected = generate(uncached, monkeypatch, self.request())[0]

    def request(self, salt: str | None = None) -> GenerationRequest:
        return request(list(self.messages), list(self.images), salt)

    def next(self, message: PromptMessage, images: list[PreprocessedImage] = ()) -> None:
        """The last answer and a new user message appended; the new turn's expected answer."""
        self.messages += [PromptMessage("assistant", (TextPart(self.expected[2]),)), message]
        self.images += images
        self.expected = generate(self.uncached, self.monkeypatch, self.request())[0]


def prompt_length(eng: ContinuousEngine, req: GenerationRequest) -> int:
    return eng.prepare(req).prompt_tokens


def test_a_turn_that_adds_text_prefills_only_the_new_tokens_and_encodes_nothing(
        cached, uncached, encoded, pictures, monkeypatch) -> None:
    chat = Conversation(uncached, monkeypatch, user(pictures["red"], "What shape is this?"), [pictures["red"]])
    tokens, last, _ = generate(cached, monkeypatch, chat.request())[0]
    assert tokens == chat.expected[0] and last.cached_tokens == 0 and encoded == [1]
    first_prompt = prompt_length(cached, chat.request())
    chat.next(user("And what colour is it?"))
    tokens, last, _ = generate(cached, monkeypatch, chat.request())[0]
    assert tokens == chat.expected[0]
    # Turn 1's prompt is where turn 2's begins: at least its full blocks come from the cache (and the
    # blocks its answer filled, where the answer reads back as the same tokens).
    assert first_prompt // 4 * 4 <= last.cached_tokens < last.prompt_tokens
    assert encoded == [1], "the image lies in the cached prefix: not encoded again"
    assert cached.cache_stats().prefix_hit_tokens == last.cached_tokens


def test_a_turn_that_adds_an_image_encodes_only_that_image(cached, uncached, encoded, pictures, monkeypatch) -> None:
    chat = Conversation(uncached, monkeypatch, user(pictures["red"], "What shape is this?"), [pictures["red"]])
    generate(cached, monkeypatch, chat.request())
    chat.next(user(pictures["blue"], "And this one?"), [pictures["blue"]])
    other = Conversation(uncached, monkeypatch, user("Say something about circles."), [])
    # The new turn beside a new conversation, in one batch: one prefilled after its cached prefix, one whole.
    (tokens, last, _), (other_tokens, other_last, _) = generate(cached, monkeypatch, chat.request(), other.request())
    assert tokens == chat.expected[0] and other_tokens == other.expected[0]
    assert last.cached_tokens > 0 and other_last.cached_tokens <= 4  # at most the chat template's opening block
    assert encoded == [1, 1]  # turn 1's image, then only the new one


def test_a_conversation_edited_before_its_images_takes_their_features_from_the_encoder_cache(
        cached, uncached, encoded, pictures, monkeypatch) -> None:
    chat = Conversation(uncached, monkeypatch, user("Look at this.", pictures["red"], "What shape is this?"),
                        [pictures["red"]])
    generate(cached, monkeypatch, chat.request())
    chat.next(user(pictures["blue"], "And this one?"), [pictures["blue"]])
    generate(cached, monkeypatch, chat.request())
    assert encoded == [1, 1]
    edited = Conversation(uncached, monkeypatch, user("Now look at this picture.", pictures["red"],
                                                      "What shape is this?"), [pictures["red"]])
    edited.next(chat.messages[2], [pictures["blue"]])
    hits = cached.runner.encoder_cache.hits
    tokens, last, _ = generate(cached, monkeypatch, edited.request())[0]
    assert tokens == edited.expected[0]
    first_image = cached.prepare(edited.request()).input_ids.index(cached.loaded.model.config.image_token_id)
    assert last.cached_tokens <= first_image  # the edit comes before both images: nothing after it matches
    assert encoded == [1, 1] and cached.runner.encoder_cache.hits == hits + 2  # both images from the cache
    stats = cached.cache_stats()
    assert stats.encoder_hit_images == hits + 2 and 0 < stats.encoder_cache_bytes <= 256 * 2**20


def test_the_same_text_with_another_image_shares_no_block_past_the_text(
        cached, uncached, pictures, monkeypatch) -> None:
    red = request([user(pictures["red"], "What shape is this?")], [pictures["red"]])
    green = request([user(pictures["green"], "What shape is this?")], [pictures["green"]])
    assert cached.prepare(red).input_ids == cached.prepare(green).input_ids  # same size: the same tokens
    generate(cached, monkeypatch, red)
    (tokens, last, _), = generate(cached, monkeypatch, green)
    assert tokens == generate(uncached, monkeypatch, green)[0][0]
    first_image = cached.prepare(green).input_ids.index(cached.loaded.model.config.image_token_id)
    assert last.cached_tokens == first_image // 4 * 4  # the blocks before the image, none after
    assert generate(cached, monkeypatch, red)[0][1].cached_tokens > first_image  # the same picture does


def test_a_cache_salt_stops_sharing_and_equal_salts_share(cached, encoded, pictures, monkeypatch) -> None:
    messages = [user(pictures["red"], "Tell me about squares and circles, and how they differ.")]
    cached_tokens = [generate(cached, monkeypatch, request(messages, [pictures["red"]], salt))[0][1].cached_tokens
                     for salt in ("tenant-a", "tenant-b", None, "tenant-a", None)]
    assert cached_tokens[:3] == [0, 0, 0] and cached_tokens[3] > 0 and cached_tokens[4] > 0
    assert encoded == [1, 1, 1]  # the image's features are not shared across salts either
