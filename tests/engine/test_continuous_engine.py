"""The continuous-batching engine on CPU: token for token what plain generate() gives, with requests
joining and leaving mid-decode, stops, limits, cancellation, seeded sampling and failures."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from demo.model import make_demo_model
from engine.continuous.engine import ContinuousEngine
from engine.continuous.prefill_graphs import ContinuedChunkGraphs
from engine.continuous.runner import compiled_graphs, seed_key
from engine.continuous.sampling import RowParams, penalize, sample
from engine.detokenizer import Detokenizer
from engine.factory import choose_engine
from engine.generate.engine import GenerateEngine
from engine.loader import load_model
from serve_app.settings import ContinuousEngineSettings, ModelSettings, QuantizationSettings
from serve_app.stage_types import GrammarSpec
from tests.engine.test_engine import plain_generate, preprocessed, run, user_request


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerateEngine]:
    """The generate() engine: what the continuous one is held to."""
    path = make_demo_model(tmp_path_factory.mktemp("continuous") / "ckpt")
    made = GenerateEngine(load_model(ModelSettings(id="demo", path=str(path), max_model_len=512, engine="generate")))
    yield made
    made.close()


def continuous(engine: GenerateEngine, **options) -> ContinuousEngine:
    """A continuous engine over the same loaded model, with these continuous-engine options."""
    return ContinuousEngine(engine.loaded.with_settings(continuous=ContinuousEngineSettings(**options)))


@pytest.fixture(scope="module")
def cengine(engine: GenerateEngine) -> Iterator[ContinuousEngine]:
    made = continuous(engine, max_slots=4)
    yield made
    made.close()


def record_detokenizers(engine, monkeypatch: pytest.MonkeyPatch) -> list:
    """Every detokenizer `engine` makes from now on, in order: their `.tokens` are each row's token ids."""
    made: list = []

    class Recording(Detokenizer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(engine, "detokenizer_type", Recording)
    return made


@pytest.fixture
def recorded(cengine: ContinuousEngine, monkeypatch: pytest.MonkeyPatch) -> list:
    return record_detokenizers(cengine, monkeypatch)


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def mixed_requests(engine, max_tokens: int = 12) -> list:
    return [
        user_request(engine, "What shape is this?", preprocessed(engine, (224, 224), (255, 0, 0)), max_tokens=max_tokens),
        user_request(engine, "How many circles are there in the picture?", preprocessed(engine, (100, 300), (0, 255, 0)),
                     max_tokens=max_tokens - 7),
        user_request(engine, "Say hello.", None, max_tokens=max_tokens - 3),
        user_request(engine, "Colour?", preprocessed(engine, (56, 56), (0, 0, 255)), max_tokens=max_tokens + 9),
    ]


def test_greedy_tokens_equal_plain_generate_alone_and_batched(engine, cengine, recorded) -> None:
    requests = mixed_requests(engine)
    alone = [plain_generate(engine, engine.prepare(r)) for r in requests]
    for request, expected in zip(requests, alone):
        run(cengine, [request])
        assert [t for t in recorded[-1].tokens if t not in engine.loaded.eos_token_ids] == expected
    recorded.clear()
    run(cengine, requests)  # one batch: different image sizes and prompt lengths, prefilled together
    assert [[t for t in d.tokens if t not in engine.loaded.eos_token_ids] for d in recorded] == alone


def test_same_text_limits_and_finish_reasons_as_the_generate_engine(engine, cengine) -> None:
    requests = [
        *mixed_requests(engine, max_tokens=30),
        user_request(engine, "Hi", None, max_tokens=25, ignore_eos=True),
        user_request(engine, "Describe.", preprocessed(engine, (112, 112), (9, 9, 9)), max_tokens=40, min_tokens=30),
        user_request(engine, "One.", None, max_tokens=1),
    ]
    expected = run(engine, requests)
    assert run(cengine, requests) == expected
    assert expected[4][1:] == ("length", 25) and expected[5][2] >= 30 and expected[6][2] == 1


def test_stop_sequences_cut_the_text_as_the_generate_engine(engine, cengine) -> None:
    request = user_request(engine, "Tell me about the picture.", preprocessed(engine, (112, 112), (200, 30, 30)),
                           max_tokens=40, ignore_eos=True)
    (full, _, _), = run(engine, [request])
    stop = full.strip()[len(full.strip()) // 2:][:3]
    assert stop, full
    stopped = user_request(engine, "Tell me about the picture.", preprocessed(engine, (112, 112), (200, 30, 30)),
                           max_tokens=40, ignore_eos=True, stop=(stop,))
    (text, reason, _), = run(cengine, [stopped])
    assert (text, reason) == run(engine, [stopped])[0][:2]
    assert reason == "stop" and stop not in text and full.startswith(text)


def test_more_requests_than_slots_wait_and_finishing_rows_free_their_slots(engine, monkeypatch) -> None:
    small = continuous(engine, max_slots=3, batch_buckets=[1, 2])
    recorded = record_detokenizers(small, monkeypatch)
    try:
        requests = [user_request(engine, f"Question number {i}?", preprocessed(engine, (56 + 28 * i, 84), (i * 40, 0, 0))
                                 if i % 2 else None, max_tokens=m, ignore_eos=True)
                    for i, m in enumerate([3, 17, 5, 21, 8, 2, 13])]
        alone = [plain_generate(engine, engine.prepare(r)) for r in requests]
        recorded.clear()
        results = run(small, requests)
        assert [count for _, _, count in results] == [3, 17, 5, 21, 8, 2, 13]
        assert [d.tokens for d in recorded] == [a for a in alone]  # ignore_eos: nothing left out either side
        assert wait_until(lambda: small.live == 0 and not small.busy)  # the last extra step drains
    finally:
        small.close()


def test_prompts_prefilled_in_chunks_give_the_same_tokens(engine, monkeypatch) -> None:
    """A budget of 24 tokens a pass cuts every image prompt into chunks (the image's tokens too): the
    later chunks attend over the earlier ones through the block table, the image encoded once."""
    chunked = continuous(engine, max_slots=4, max_prefill_tokens=24, block_size=4, min_length_bucket=16)
    recorded = record_detokenizers(chunked, monkeypatch)
    try:
        requests = mixed_requests(engine, max_tokens=16)
        assert max(engine.prepare(r).prompt_tokens for r in requests) > 2 * 24
        alone = [plain_generate(engine, engine.prepare(r)) for r in requests]
        recorded.clear()
        run(chunked, requests)
        assert [[t for t in d.tokens if t not in engine.loaded.eos_token_ids] for d in recorded] == alone
        assert wait_until(lambda: not chunked.busy)
        assert chunked.scheduler.pool.free == chunked.scheduler.pool.capacity  # every block given back
    finally:
        chunked.close()


def test_rows_preempted_when_blocks_run_out_resume_to_the_same_tokens(engine, cengine, monkeypatch) -> None:
    """A cache too small for every row at once: the youngest rows are preempted, prefilled again with
    their output so far, and end as they would have alone (seeded sampling included)."""
    requests = [user_request(engine, f"Question number {i}?", preprocessed(engine, (56, 84), (i * 60, 0, 0))
                             if i % 2 else None, max_tokens=60, ignore_eos=True, **sampling)
                for i, sampling in enumerate([{}, {}, {"temperature": 0.9, "seed": 7}, {}])]
    alone = []
    for request in requests:
        recorded = record_detokenizers(cengine, monkeypatch)
        run(cengine, [request])
        alone.append(recorded[-1].tokens)
    tight = continuous(engine, max_slots=4, block_size=4, min_length_bucket=16, kv_cache_blocks=60)
    try:
        prepared = [engine.prepare(r) for r in requests]
        assert sum(p.prompt_tokens + p.max_tokens for p in prepared) > 59 * 4  # more than the cache holds
        recorded = record_detokenizers(tight, monkeypatch)
        run(tight, requests)
        assert tight.scheduler.preemptions > 0
        assert [d.tokens for d in recorded] == alone
        assert wait_until(lambda: not tight.busy)
        assert tight.scheduler.pool.free == tight.scheduler.pool.capacity
    finally:
        tight.close()


def test_a_request_arriving_mid_decode_joins_within_two_steps(engine, cengine, monkeypatch) -> None:
    long = engine.prepare(user_request(engine, "A long story.", None, max_tokens=200, ignore_eos=True))
    late_request = user_request(engine, "Colour?", preprocessed(engine, (84, 84), (0, 90, 200)), max_tokens=6)
    late = engine.prepare(late_request)
    first_token_step: list[int] = []

    class FirstToken(Detokenizer):
        def add(self, token: int):
            if not first_token_step:
                first_token_step.append(cengine.decode_steps)
            return super().add(token)

    arrival: list = []
    late_texts: list[str] = []

    def on_long(chunks) -> None:
        # Submitted from the engine thread between steps, so the step it arrives at is exact.
        if cengine.decode_steps >= 10 and not arrival:
            monkeypatch.setattr(cengine, "detokenizer_type", FirstToken)
            arrival.append((cengine.decode_steps, cengine.submit([late], lambda c: late_texts.append(c[0].text))))

    long_done = cengine.submit([long], on_long)
    for _ in range(300):
        if arrival:
            break
        time.sleep(0.1)
    arrived_at, late_done = arrival[0]
    late_done.result(timeout=30)
    assert not long_done.done(), "the late request waited for the running one to finish"
    # The step in flight when it arrived, then the one launched with it before its first token is read.
    assert first_token_step[0] - arrived_at <= 2, (arrived_at, first_token_step)
    long.cancelled = True
    long_done.result(timeout=30)
    assert "".join(late_texts) == run(engine, [late_request])[0][0]


def test_cancelled_rows_leave_at_the_next_step_and_free_their_slot(engine, cengine) -> None:
    doomed = engine.prepare(user_request(engine, "Go on forever.", None, max_tokens=400, ignore_eos=True))
    chunks_seen: list = []

    def on_step(chunks) -> None:
        chunks_seen.append(chunks[0])
        if len(chunks_seen) == 5:
            doomed.cancelled = True

    cengine.submit([doomed], on_step).result(timeout=30)
    assert all(c.finish_reason is None for c in chunks_seen)  # no final chunk: nobody is listening
    assert 5 <= chunks_seen[-1].completion_tokens <= 8
    assert wait_until(lambda: cengine.live == 0)
    waiting = engine.prepare(user_request(engine, "Never mind.", None, max_tokens=50))
    waiting.cancelled = True  # gone before it was admitted: never prefilled
    cengine.submit([waiting], lambda chunks: pytest.fail("a cancelled request produced text")).result(timeout=30)
    assert run(cengine, [user_request(engine, "Hi", None, max_tokens=4)])[0][2] >= 1


def test_seeded_sampling_is_repeatable_and_independent_of_batch(engine, cengine) -> None:
    sampled = user_request(engine, "Tell me.", None, temperature=1.0, top_p=0.9, seed=42, max_tokens=10)
    alone = run(cengine, [sampled])[0]
    with_neighbours = run(cengine, [user_request(engine, "Other.", None, temperature=0.7, seed=1),
                                    user_request(engine, "Greedy.", None), sampled])[2]
    assert alone == with_neighbours == run(cengine, [sampled])[0]
    other_seed = user_request(engine, "Tell me.", None, temperature=1.0, top_p=0.9, seed=43, max_tokens=10)
    assert run(cengine, [other_seed])[0] != alone


def test_sampling_follows_the_distribution_top_k_and_top_p() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0]]).repeat(4000, 1)
    rows = logits.shape[0]

    def draw(temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
        params = RowParams(temperature=torch.full((rows,), temperature), top_p=torch.full((rows,), top_p),
                           seed=torch.arange(rows) * 7919, counter=torch.full((rows,), 3, dtype=torch.long),
                           suppress_eos=torch.zeros(rows, dtype=torch.bool), top_k=torch.full((rows,), top_k))
        return sample(logits, params, torch.zeros(5, dtype=torch.bool), any_sampled=True)

    frequencies = torch.bincount(draw(1.0, 1.0), minlength=5).float() / rows
    assert torch.allclose(frequencies, torch.softmax(logits[0], -1), atol=0.03), frequencies
    # top_p 0.8: the smallest set reaching 0.8 is the first two tokens (0.64 + 0.24).
    assert set(draw(1.0, 0.8).tolist()) == {0, 1}
    # top_k 2: the two most likely, in proportion to each other.
    two = draw(1.0, 1.0, top_k=2)
    assert set(two.tolist()) == {0, 1}
    assert torch.allclose(torch.bincount(two, minlength=5)[:2].float() / rows, torch.softmax(logits[0, :2], -1),
                          atol=0.03)
    # top_p reads what top_k kept, renormalised: of the first three, token 0 alone has 0.665 >= 0.66.
    assert set(draw(1.0, 0.66, top_k=3).tolist()) == {0}
    # A temperature too small to divide by is the greedy limit, not NaN.
    assert set(draw(1e-45, 1.0).tolist()) == {0}
    greedy = RowParams(torch.zeros(1), torch.ones(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                       torch.tensor([True]))
    eos = torch.tensor([True, False, False, False, False])
    assert sample(logits[:1], greedy, eos, any_sampled=False).item() == 1  # end-of-sequence suppressed


def test_the_repetition_penalty_is_transformers_own_row_by_row() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    tokens = [[1, 5, 5, 39], [0, 2], [7]]
    penalties = [1.3, 0.8, 1.0]
    seen = torch.zeros(3, 40, dtype=torch.bool)
    for row, ids in enumerate(tokens):
        seen[row, ids] = True
    got = penalize(logits, seen, torch.tensor(penalties))
    for row, (ids, penalty) in enumerate(zip(tokens, penalties)):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[row:row + 1].clone())[0]
        assert torch.equal(got[row], expected), row


def test_top_k_repetition_penalty_and_seeds_as_the_generate_engine(engine, cengine) -> None:
    image = preprocessed(engine, (112, 112), (200, 30, 30))

    def ask(**sampling):
        return user_request(engine, "Tell me about the picture.", image, max_tokens=40, ignore_eos=True, **sampling)

    # Greedy with a penalty: the generate() engine's answer, which is transformers' (test_engine.py).
    penalized = ask(repetition_penalty=1.3)
    assert run(cengine, [penalized, ask()]) == run(engine, [penalized, ask()])
    assert run(cengine, [penalized])[0] != run(cengine, [ask()])[0]
    # top_k 1 leaves a hot sample nothing but the greedy token; a temperature too small to divide by
    # is greedy too.
    hot = ask(temperature=1.5, seed=3)
    assert run(cengine, [hot]) != run(cengine, [ask()])
    assert run(cengine, [ask(temperature=1.5, seed=3, top_k=1), ask(temperature=1e-45, seed=3)]) == \
        run(cengine, [ask()]) * 2
    # The whole seed counts: seeds 2**32 apart (or past 64 bits) give their own streams, each repeatable.
    seeds = [42, 42 + 2**32, 2**63 - 1, -5, 2**64 + 42]
    assert len({seed_key(s) for s in seeds}) == len(seeds)
    # A request's n choices: each its own stream, the first the seed's alone.
    assert seed_key(seeds[0], 0) == seed_key(seeds[0]) and len({seed_key(seeds[0], c) for c in range(8)}) == 8
    texts = [run(cengine, [ask(temperature=1.0, seed=s)])[0] for s in seeds]
    assert len(set(texts)) == len(seeds)
    assert run(cengine, [ask(temperature=1.0, seed=seeds[1])])[0] == texts[1]


def test_a_failed_prefill_fails_only_its_group(engine, cengine, monkeypatch: pytest.MonkeyPatch) -> None:
    original = cengine.runner.decoder.prefill
    calls = []

    def broken_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("prefill broke (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(cengine.runner.decoder, "prefill", broken_once)
    with pytest.raises(RuntimeError, match="simulated"):
        run(cengine, [user_request(engine, "Hi", None, max_tokens=4)])
    assert run(cengine, [user_request(engine, "Hi", None, max_tokens=4)])[0][2] >= 1


def test_image_tokens_that_do_not_match_the_pixels_fail_only_their_group(engine, cengine) -> None:
    # Counted on the host before anything runs on the device (Glm4vDecoder.merge_images).
    request = user_request(engine, "What shape is this?", preprocessed(engine, (224, 224), (255, 0, 0)), max_tokens=4)
    good = cengine.prepare(request)
    ids = list(good.input_ids)
    first = ids.index(engine.loaded.model.config.image_token_id)
    ids[first] = ids[first - 1]  # one image token fewer than the image's features
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        cengine.generate_batch([replace(good, input_ids=ids)], lambda chunks: None)
    assert run(cengine, [request])[0][2] >= 1


def test_a_failed_step_fails_every_request_in_flight_and_the_engine_goes_on(engine, cengine, monkeypatch) -> None:
    original = cengine.runner.decode
    calls = []

    def broken_once(batch):
        if not calls:
            calls.append(batch)
            raise RuntimeError("CUDA error: device lost (simulated)")
        return original(batch)

    monkeypatch.setattr(cengine.runner, "decode", broken_once)
    with pytest.raises(RuntimeError, match="device lost"):
        run(cengine, [user_request(engine, "Hi", None, max_tokens=20, ignore_eos=True),
                      user_request(engine, "Ho", None, max_tokens=20, ignore_eos=True)])
    assert wait_until(lambda: cengine.live == 0)
    assert run(cengine, [user_request(engine, "Hi", None, max_tokens=4, ignore_eos=True)])[0][1:] == ("length", 4)


def test_probe_and_busy_for_the_health_check(engine, cengine, monkeypatch: pytest.MonkeyPatch) -> None:
    cengine.probe()
    assert wait_until(lambda: not cengine.busy)  # once the earlier tests' last steps have drained
    request = engine.prepare(user_request(engine, "Long.", None, max_tokens=300, ignore_eos=True))
    seen = threading.Event()
    done = cengine.submit([request], lambda chunks: seen.set())
    assert seen.wait(30) and cengine.busy and time.monotonic() - cengine.last_step_at < 5
    request.cancelled = True
    done.result(timeout=30)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device lost (simulated)")

    monkeypatch.setattr(engine.loaded.model.model.language_model, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        cengine.probe()


def test_the_replica_health_check_probes_through_the_engine_thread(engine, cengine, monkeypatch) -> None:
    from tests.deployments.test_health import replica, torch_error

    asyncio.run(replica(cengine).check_health())
    monkeypatch.setattr(engine.loaded.model.model.language_model, "forward", torch_error())
    with pytest.raises(RuntimeError, match="device lost"):
        asyncio.run(replica(cengine).check_health())


def test_auto_picks_the_continuous_engine_where_it_can(engine) -> None:
    def chosen_type(**update) -> type:
        chosen = choose_engine(engine.loaded.with_settings(**update))
        chosen.close()
        return type(chosen)

    assert chosen_type(engine="auto") is ContinuousEngine
    assert chosen_type(engine="generate") is GenerateEngine
    # An int8 KV cache is the paged cache's own format; int4 is transformers' QuantizedCache, generate() only.
    int8_kv = QuantizationSettings(kv_cache="int8")
    assert chosen_type(engine="auto", quantization=int8_kv) is ContinuousEngine
    assert chosen_type(engine="continuous", quantization=int8_kv) is ContinuousEngine
    int4_kv = QuantizationSettings(kv_cache="int4")
    assert chosen_type(engine="auto", quantization=int4_kv) is GenerateEngine
    with pytest.raises(ValueError, match=r"int4 quantized KV cache is only available with generate\(\)"):
        choose_engine(engine.loaded.with_settings(engine="continuous", quantization=int4_kv))


def test_the_compiled_decode_step_has_no_graph_breaks_and_gives_the_same_tokens(engine, cengine) -> None:
    """`compile: true` as on the GPU (there it is then captured in CUDA graphs, which needs a step
    without host synchronisation: a graph break would show where one hides). Slow on a CPU: one
    batch size, both sampling variants, and a span change (256 -> 512 cache positions)."""
    compiled = continuous(engine, max_slots=2, batch_buckets=[2], compile=True, compile_mode="default")
    try:
        decoder = compiled.runner.decoder

        def explain() -> int:  # all slots inactive: the traced run changes nothing
            return torch._dynamo.explain(decoder.step)(compiled.runner.state.active[:2], decoder.span_ids[:256],
                                                       True).graph_break_count

        assert compiled.call(explain) == 0
        requests = [
            user_request(engine, "Hi", None, max_tokens=260, ignore_eos=True),
            user_request(engine, "Tell me.", preprocessed(engine, (56, 56), (5, 5, 5)), temperature=0.8, top_p=0.9,
                         seed=3, max_tokens=20),
        ]
        assert run(compiled, requests) == run(cengine, requests)
    finally:
        compiled.close()


def test_the_forward_compiles_twice_for_every_batch_size_span_and_sampling_variant(engine) -> None:
    """Compiling a large model's whole forward takes minutes, so the
    step must not recompile per (batch, span, sampled) key, nor per layer: one dynamic-shape
    compilation of the decoder layer serves every layer, one more for batch 1 (PyTorch specialises
    sizes of 1), and sampling, which runs eagerly, adds none. The same for the prefill's prompt
    layer over every batch size and prompt width."""
    assert len(engine.loaded.model.model.language_model.layers) >= 2  # else "not per layer" is not tested

    compiled = continuous(engine, max_slots=8, batch_buckets=[1, 2, 4, 8], compile=True, compile_mode="default")
    try:
        before = compiled_graphs()

        def every_key() -> None:  # all slots idle: the steps change nothing a request reads
            for span in (256, 512):
                for rows in (8, 4, 2, 1):
                    for sampled in (False, True):
                        compiled.runner.steps.run((rows, span, sampled, False))

        compiled.call(every_key)
        assert compiled_graphs() - before == 2

        def prompts(rows: int, width: int, start: int) -> None:  # into the scratch block: nothing reads it
            runner = compiled.runner
            ids = torch.full((rows, start + width), engine.loaded.pad_token_id, dtype=torch.long)
            embedded = runner.decoder.embed_prompts({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                                    runner.device)
            runner.decoder.prefill(embedded, runner.scratch_chunk(rows, width, start), torch.full((rows,), width - 1))

        # The engine's warm-up compiles the prompt layer twice (any batch and width; batch 1) and the
        # layer of continued chunks (batch 1) once, on shapes that leave no alignment to assume: a graph
        # first traced on an even shape may assume its alignment and be compiled again for an odd one,
        # a stall mid-serving.
        before = compiled_graphs()
        compiled.call(compiled.runner.warm_prefill)
        assert compiled_graphs() - before == 3
        for rows, width, start in ((4, 285, 0), (1, 285, 0), (2, 32, 0), (8, 64, 0), (1, 20, 0), (5, 300, 0),
                                   (1, 64, 32), (1, 300, 500), (1, 16, 16)):
            compiled.call(lambda rows=rows, width=width, start=start: prompts(rows, width, start))
        assert compiled_graphs() - before == 3

        # Nor do the padded passes that CUDA graphs of continued chunks capture (prefill_graphs.py).
        runner = compiled.runner
        graphs = ContinuedChunkGraphs(runner.decoder, max_width=512, max_blocks=64, device=runner.device)

        def padded(width: int, start: int) -> None:
            ids = torch.full((1, start + width), engine.loaded.pad_token_id, dtype=torch.long)
            embedded = runner.decoder.embed_prompts({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                                    runner.device)
            chunk, last = runner.scratch_chunk(1, width, start), torch.tensor([width - 1])
            key = graphs.key(chunk)
            graphs.stage(key, embedded, chunk, last)
            graphs.padded_pass(key)

        for width, start in ((21, 40), (130, 100), (300, 500)):
            compiled.call(lambda width=width, start=start: padded(width, start))
        assert compiled_graphs() - before == 3
    finally:
        compiled.close()


def test_a_request_cancelled_while_waiting_for_a_slot_is_dropped_at_once(engine) -> None:
    one = continuous(engine, max_slots=1)
    try:
        running = engine.prepare(user_request(engine, "Long.", None, max_tokens=300, ignore_eos=True))
        queued = engine.prepare(user_request(engine, "Queued.", None, max_tokens=5))
        running_done = one.submit([running], lambda chunks: None)
        queued_done = one.submit([queued], lambda chunks: pytest.fail("a cancelled request produced text"))
        queued.cancelled = True
        queued_done.result(timeout=30)
        assert not running_done.done(), "the queued request was only dropped once the slot was free"
        running.cancelled = True
        running_done.result(timeout=30)
    finally:
        one.close()


def chunks_of(engine, prepared: list) -> list[list]:
    """Every chunk (or error) each prepared request's row got, through one submit of `engine`."""
    got: list[list] = [[] for _ in prepared]

    def on_step(entries) -> None:
        for i, entry in enumerate(entries):
            if entry is not None:
                got[i].append(entry)

    engine.submit(prepared, on_step).result(timeout=120)
    return got


SCHEMA = GrammarSpec("json_schema", schema=json.dumps({
    "type": "object", "properties": {"shape": {"enum": ["circle", "square"]}, "count": {"enum": [1, 2, 3]}},
    "required": ["shape", "count"]}, sort_keys=True))


def test_grammar_rows_follow_their_schema_and_decode_as_the_generate_engine(engine, cengine) -> None:
    """A constrained row beside an unconstrained one: the JSON it writes parses, matches the schema, and
    is token for token what the generate() engine writes; its neighbour is as it would be alone."""
    image = preprocessed(engine, (224, 224), (255, 0, 0))
    constrained = user_request(engine, "What shape is this?", image, max_tokens=40, grammar=SCHEMA)
    free = user_request(engine, "What shape is this?", preprocessed(engine, (224, 224), (255, 0, 0)), max_tokens=12)
    expected = run(engine, [constrained, free])
    got = run(cengine, [constrained, free])
    assert got == expected
    text, reason, _ = got[0]
    answer = json.loads(text)
    assert reason == "stop" and answer["shape"] in ("circle", "square") and answer["count"] in (1, 2, 3)
    assert got[1] == run(cengine, [free])[0]


def test_a_grammar_that_cannot_compile_fails_its_row_alone(engine, cengine) -> None:
    broken = GrammarSpec("json_schema", schema=json.dumps({"type": "object", "properties": {
        "a": {"$ref": "#/$defs/missing"}}}))
    good = cengine.prepare(user_request(engine, "Say hello.", None))
    bad = replace(good, sampling=replace(good.sampling, grammar=broken))
    got = chunks_of(cengine, [bad, good])
    assert len(got[0]) == 1 and isinstance(got[0][0], ValueError)
    assert got[1][-1].finish_reason is not None


def test_logprobs_equal_the_generate_engines_from_the_same_logits(engine, cengine) -> None:
    request = user_request(engine, "What shape is this?", preprocessed(engine, (224, 224), (0, 0, 255)), max_tokens=10,
                           logprobs=5)
    expected = [e for c in chunks_of(engine, [engine.prepare(request)])[0] for e in c.logprobs]
    got = [e for c in chunks_of(cengine, [cengine.prepare(request)])[0] for e in c.logprobs]
    assert [e.token for e in got] == [e.token for e in expected] and len(got) == 10
    for mine, theirs in zip(got, expected):
        assert abs(mine.logprob - theirs.logprob) < 1e-4
        assert [t.token for t in mine.top] == [t.token for t in theirs.top] and len(mine.top) == 5


def test_n_choices_prefill_once_and_decode_as_one_request_each(engine, cengine, monkeypatch) -> None:
    """Greedy choices of one request all give the single request's tokens; the later ones copied the
    first one's prefilled blocks (one prompt run through the model, not three)."""
    request = user_request(engine, "What shape is this?", preprocessed(engine, (112, 112), (0, 255, 0)), max_tokens=9)
    alone = chunks_of(cengine, [cengine.prepare(request)])[0]
    passes = []
    original = cengine.runner.decoder.prefill
    monkeypatch.setattr(cengine.runner.decoder, "prefill",
                        lambda prompts, chunk, last: passes.append(chunk.write_blocks.shape[0]) or original(prompts, chunk,
                                                                                                      last))
    choices = cengine.prepare(request).choices(3)
    got = chunks_of(cengine, choices)
    assert passes == [1]  # one row through the model
    text = "".join(c.text for c in alone)
    assert ["".join(c.text for c in row) for row in got] == [text] * 3
