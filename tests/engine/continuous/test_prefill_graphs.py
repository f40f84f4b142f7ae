"""CUDA graphs of continued prompt chunks: the buckets anywhere; on a GPU, the same tokens as without
graphs, turn after turn of a conversation whose later turns continue a cached prefix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.continuous.prefill_graphs import WIDTH_BUCKETS, bucket_for, context_buckets


def test_a_size_takes_the_smallest_bucket_that_holds_it_and_none_past_the_last() -> None:
    assert [bucket_for(n, WIDTH_BUCKETS) for n in (1, 16, 17, 300, 387, 4096)] == [16, 16, 32, 384, 512, 4096]
    assert bucket_for(4097, WIDTH_BUCKETS) is None


def test_context_buckets_double_from_two_and_end_at_the_largest_table() -> None:
    assert context_buckets(1025) == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1025]
    assert context_buckets(64) == [2, 4, 8, 16, 32, 64]
    assert context_buckets(1) == [2]  # never a size of 1: torch.compile specialises it


def test_the_padded_pass_a_graph_holds_gives_the_logits_of_the_plain_pass(loaded) -> None:
    """On any device: a continued chunk padded to its buckets (pad columns into the scratch block, pad
    context blocks read by nothing) ends in the same logits as the chunk run as it is."""
    from engine.continuous.engine import ContinuousEngine
    from engine.continuous.prefill_graphs import ContinuedChunkGraphs
    from engine.models.glm4v.decoder import PromptChunk
    from serve_app.settings import ContinuousEngineSettings

    engine = ContinuousEngine(loaded.with_settings(continuous=ContinuousEngineSettings(max_slots=2)))
    try:
        runner = engine.runner
        decoder, device, block_size = runner.decoder, runner.device, runner.cache.block_size
        start, width = 2 * block_size + 3, 21  # the chunk starts mid-block and ends in a later one
        end = start + width
        blocks = list(range(1, end // block_size + 2))  # any blocks but the scratch one

        def layout(first: int, last_column: int, context: bool) -> PromptChunk:
            positions = torch.arange(first, last_column)
            where = torch.tensor(blocks)[positions // block_size][None].to(device)
            chunk = PromptChunk(first, last_column - first, where, (positions % block_size)[None].to(device))
            if context:
                chunk.context_blocks = torch.tensor([blocks[:last_column // block_size + 1]], device=device)
                chunk.context_bounds = torch.tensor([[0, width], [0, end]], dtype=torch.int32, device=device)
            return chunk

        ids = torch.randint(10, 200, (1, end), generator=torch.Generator().manual_seed(0))
        prompts = decoder.embed_prompts({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, device)
        decoder.prefill(prompts, layout(0, start, context=False), torch.tensor([start - 1], device=device))
        chunk, last = layout(start, end, context=True), torch.tensor([width - 1], device=device)
        expected = decoder.prefill(prompts, chunk, last)

        graphs = ContinuedChunkGraphs(decoder, max_width=64, max_blocks=16, device=device)
        key = graphs.key(chunk)
        assert key == (32, 4)  # both padded: 21 columns to 32, 3 context blocks to 4
        with torch.inference_mode():  # as on the engine thread
            graphs.stage(key, prompts, chunk, last)
            torch.testing.assert_close(graphs.padded_pass(key), expected, atol=1e-5, rtol=1e-5)
    finally:
        engine.close()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    from demo.model import make_demo_model
    from engine.loader import load_model
    from serve_app.settings import ModelSettings

    path: Path = make_demo_model(tmp_path_factory.mktemp("graphs") / "ckpt")
    # float32: the exactness of the graph against the same pass without one, not of bf16 rounding.
    return load_model(ModelSettings(id="demo", path=str(path), max_model_len=512, dtype="float32"))


def engines(loaded) -> Iterator:
    from engine.continuous.engine import ContinuousEngine
    from serve_app.settings import ContinuousEngineSettings

    for graphs in (True, False):
        # max_prefill_tokens 48: the first turn's prompt is prefilled in chunks too, the later ones continue.
        options = ContinuousEngineSettings(max_slots=2, cuda_graphs=graphs, max_prefill_tokens=48, warmup_max_len=0)
        yield ContinuousEngine(loaded.with_settings(continuous=options))


@needs_cuda
def test_continued_chunks_from_graphs_give_the_tokens_of_the_plain_pass(loaded, monkeypatch) -> None:
    from engine.prompts import Prompter
    from serve_app.stage_types import GenerationRequest, ImagePart, PromptMessage, SamplingParams, TextPart
    from tests.engine.test_continuous_engine import chunks_of, record_detokenizers
    from tests.engine.test_engine import preprocessed

    image = preprocessed(loaded, (112, 112), (255, 0, 0))  # it reads .settings.path only
    prompter = Prompter(loaded.settings, loaded.processor)
    answers: dict[bool, list[list[int]]] = {}
    for graphs, engine in zip((True, False), engines(loaded)):
        messages, answers[graphs] = [], []
        made = record_detokenizers(engine, monkeypatch)
        try:
            for turn, question in enumerate(["What shape is this?", "And its colour?", "Say it again."]):
                parts = (ImagePart(), TextPart(question)) if turn == 0 else (TextPart(question),)
                messages.append(PromptMessage("user", parts))
                request = GenerationRequest(list(messages), [image], SamplingParams(max_tokens=8, temperature=0.0))
                chunks = chunks_of(engine, [prompter.prepare(request)])[0]
                assert not any(isinstance(c, BaseException) for c in chunks), chunks
                answers[graphs].append(list(made[-1].tokens))
                if turn:
                    assert chunks[-1].cached_tokens > 0
                messages.append(PromptMessage("assistant", (TextPart("".join(c.text for c in chunks)),)))
            graphs_made = engine.runner.prefill_graphs.captured if engine.runner.prefill_graphs else 0
            assert graphs_made > 0 if graphs else graphs_made == 0
        finally:
            engine.close()
    assert answers[True] == answers[False]
