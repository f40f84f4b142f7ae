"""The continuous engine over an int8 paged KV cache (kv_cache: int8), on the CPU with the trained demo
model (4.6M parameters, float32): its greedy tokens against the same engine over a float cache,
chunked prefill, preemption, n choices copying blocks (scales too), the cache's bytes, and a decode
step with no graph breaks (it is compiled and captured on a GPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.attention.kv_format import KV_FORMATS, Int8Layer
from engine.continuous.engine import ContinuousEngine
from engine.continuous.slots import PagedKVCache
from engine.loader import LoadedModel, load_model
from serve_app.settings import ContinuousEngineSettings, ModelSettings, QuantizationSettings
from tests.engine.test_continuous_engine import mixed_requests, record_detokenizers, wait_until
from tests.engine.test_engine import preprocessed, run, user_request

TRAINED = Path(__file__).resolve().parents[3] / "checkpoints" / "glm4v-demo-vqa"

# Share of greedy tokens (position by position) the int8 cache reproduces: all of them measured with
# the trained model, chunked or not. (The random demo model's near-flat logits let rounding flip a
# token, after which its rows part: 81-90% there, which would test luck more than the cache.)
AGREEMENT = 0.95

pytestmark = pytest.mark.skipif(not (TRAINED / "config.json").exists(), reason="needs the trained demo checkpoint")


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(ModelSettings(id="demo", path=str(TRAINED), dtype="float32", device="cpu", max_model_len=512,
                                    engine="continuous"))


def continuous(loaded: LoadedModel, kv_cache: str, **options) -> ContinuousEngine:
    return ContinuousEngine(loaded.with_settings(continuous=ContinuousEngineSettings(**options),
                                                 quantization=QuantizationSettings(kv_cache=kv_cache)))


@pytest.fixture(scope="module")
def int8(loaded: LoadedModel) -> Iterator[ContinuousEngine]:
    made = continuous(loaded, "int8", max_slots=4)
    yield made
    made.close()


def requests(engine: ContinuousEngine) -> list:
    return [*mixed_requests(engine, max_tokens=40),
            user_request(engine, "Tell me about the picture.", preprocessed(engine, (112, 112), (200, 30, 30)),
                         max_tokens=60, ignore_eos=True)]


def greedy_tokens(engine: ContinuousEngine, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    recorded = record_detokenizers(engine, monkeypatch)
    run(engine, requests(engine))
    return [d.tokens for d in recorded]


def agreement(expected: list[list[int]], got: list[list[int]]) -> float:
    same = sum(a == b for want, have in zip(expected, got) for a, b in zip(want, have))
    return same / sum(len(want) for want in expected)


@pytest.fixture(scope="module")
def float_tokens(loaded: LoadedModel) -> list[list[int]]:
    engine = continuous(loaded, "none", max_slots=4)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            return greedy_tokens(engine, monkeypatch)
    finally:
        engine.close()


def test_the_int8_cache_holds_codes_and_scales_in_about_a_quarter_of_float32s_bytes(loaded, int8) -> None:
    cache = int8.runner.cache
    assert cache.format is KV_FORMATS["int8"]
    layer = cache.layers[0]
    assert isinstance(layer, Int8Layer) and layer.keys.dtype == torch.int8
    assert layer.key_scales.shape == layer.keys.shape[:3] and layer.key_scales.dtype == torch.float32
    text = loaded.model.config.text_config
    kv_heads, head_dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    per_block = PagedKVCache.block_bytes(text.num_hidden_layers, cache.block_size, kv_heads, head_dim, torch.float32,
                                         KV_FORMATS["int8"])
    assert cache.bytes() == cache.num_blocks * per_block
    assert per_block / PagedKVCache.block_bytes(text.num_hidden_layers, cache.block_size, kv_heads, head_dim,
                                                torch.float32) == (head_dim + 4) / (4 * head_dim)


def test_int8_bytes_per_token_are_at_most_55_percent_of_bf16s_at_head_dim_128() -> None:
    def per_token(kv_format: str) -> int:  # GLM-4.6V-Flash: 40 layers, 2 kv heads of 128
        return PagedKVCache.block_bytes(40, 1, 2, 128, torch.bfloat16, KV_FORMATS[kv_format])

    assert per_token("int8") == 40 * 2 * 2 * (128 + 4)
    assert per_token("int8") / per_token("none") <= 0.55


def test_greedy_tokens_mostly_agree_with_the_float_cache(int8, float_tokens, monkeypatch) -> None:
    got = greedy_tokens(int8, monkeypatch)
    assert agreement(float_tokens, got) >= AGREEMENT, agreement(float_tokens, got)


def test_chunked_prefill_reads_the_earlier_chunks_from_the_int8_cache(loaded, float_tokens, monkeypatch) -> None:
    """24 tokens a pass: every image prompt is cut into chunks, the later ones attending over the
    earlier ones dequantized from the cache."""
    chunked = continuous(loaded, "int8", max_slots=4, max_prefill_tokens=24, block_size=4, min_length_bucket=16)
    try:
        assert max(chunked.prepare(r).prompt_tokens for r in requests(chunked)) > 2 * 24
        got = greedy_tokens(chunked, monkeypatch)
        assert agreement(float_tokens, got) >= AGREEMENT, agreement(float_tokens, got)
        assert wait_until(lambda: not chunked.busy)
        assert chunked.scheduler.pool.free == chunked.scheduler.pool.capacity
    finally:
        chunked.close()


def test_preempted_rows_resume_and_give_every_block_back(loaded, int8) -> None:
    batch = [user_request(int8, f"Question number {i}?", preprocessed(int8, (56, 84), (i * 60, 0, 0)) if i % 2 else None,
                          max_tokens=60, ignore_eos=True) for i in range(4)]
    tight = continuous(loaded, "int8", max_slots=4, block_size=4, min_length_bucket=16, kv_cache_blocks=60)
    try:
        results = run(tight, batch)
        assert tight.scheduler.preemptions > 0
        assert [count for _, _, count in results] == [60] * 4
        assert wait_until(lambda: not tight.busy)
        assert tight.scheduler.pool.free == tight.scheduler.pool.capacity
    finally:
        tight.close()


def test_n_choices_copy_the_leaders_codes_and_scales(int8) -> None:
    """Greedy choices decode from copies of the first one's prefilled blocks: identical tokens only if
    the copies carry the scales too (zero scales would read back as zeros)."""
    request = user_request(int8, "What shape is this?", preprocessed(int8, (112, 112), (0, 255, 0)), max_tokens=9)
    alone = run(int8, [request])[0]
    texts = [""] * 3

    def on_step(entries) -> None:
        for i, entry in enumerate(entries):
            if entry is not None:
                texts[i] += entry.text

    int8.submit(int8.prepare(request).choices(3), on_step).result(timeout=120)
    assert texts == [alone[0]] * 3


def test_copy_blocks_copies_codes_and_scales_of_every_layer() -> None:
    cache = PagedKVCache(2, 6, 4, 2, 8, torch.float32, torch.device("cpu"), KV_FORMATS["int8"])
    blocks = torch.arange(6)[:, None].expand(6, 4)
    offsets = torch.arange(4)[None, :].expand(6, 4)
    for layer in cache.layers:
        cache.format.store(layer, blocks, offsets, torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8))
    cache.copy_blocks([1, 2], [4, 5])
    for layer in cache.layers:
        for tensor in layer:
            assert torch.equal(tensor[[4, 5]], tensor[[1, 2]]) and tensor[1].abs().sum() > 0


def test_the_int8_decode_step_has_no_graph_breaks(int8) -> None:
    """Quantizing on write and dequantizing on read stay inside the traced step: no host reads that
    would break the graph compiled and captured on a GPU."""
    decoder = int8.runner.decoder

    def explain() -> int:  # all slots inactive: the traced run changes nothing
        return torch._dynamo.explain(decoder.step)(int8.runner.state.active[:2], decoder.span_ids[:256],
                                                   False).graph_break_count

    assert int8.call(explain) == 0
