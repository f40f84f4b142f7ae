"""The decoder's fused q/k/v projection: the same outputs side by side, one copy of the weights."""

from __future__ import annotations

import torch
from torch import nn

from engine.models.glm4v.decoder import fuse_linears
from tests.engine.test_continuous_engine import engine  # noqa: F401 - the demo model fixture


def test_fused_linears_give_the_outputs_side_by_side_and_hold_the_weights_once() -> None:
    torch.manual_seed(0)
    q, k, v = nn.Linear(16, 32), nn.Linear(16, 8), nn.Linear(16, 8)
    x = torch.randn(3, 16)
    expected = torch.cat([q(x), k(x), v(x)], dim=-1)
    fused = fuse_linears([q, k, v])
    torch.testing.assert_close(fused(x), expected)
    # The originals still compute (HF's forward calls them), from views of the fused weights.
    torch.testing.assert_close(torch.cat([q(x), k(x), v(x)], dim=-1), expected)
    assert k.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()


def test_only_plain_linears_over_one_input_fuse() -> None:
    assert fuse_linears([nn.Linear(16, 8), nn.Linear(12, 8)]) is None
    assert fuse_linears([nn.Linear(16, 8), nn.Linear(16, 8, bias=False)]) is None
    assert fuse_linears([]) is None


def test_rope_positions_are_transformers_own_with_text_after_and_between_images(engine) -> None:
    """The positions walk only up to the last image and continue the text after it as an arange: the
    result must be transformers' get_rope_index over the whole prompts, deltas included, for left-padded
    rows with text after, between and without images after them."""
    from types import SimpleNamespace

    from engine.models.glm4v.decoder import Glm4vDecoder
    from serve_app.stage_types import GenerationRequest, ImagePart, PromptMessage, SamplingParams, TextPart
    from tests.engine.test_engine import preprocessed

    red, blue = preprocessed(engine, (112, 112), (255, 0, 0)), preprocessed(engine, (84, 140), (0, 0, 255))

    def prepared(parts: tuple, images: list):
        message = PromptMessage("user", tuple(TextPart(p) if isinstance(p, str) else ImagePart() for p in parts))
        return engine.prepare(GenerationRequest([message], images, SamplingParams(max_tokens=4)))

    batches = [
        [prepared((None, "what is this " * 30), [red])],
        [prepared(("first", None, "then", None, "and a long question " * 20), [red, blue]),
         prepared((None, "short"), [blue]), prepared(("no picture at all, only words",), [])],
        [prepared(("text first, the picture last:", None), [red])],
    ]
    model = engine.loaded.model
    decoder = SimpleNamespace(model=model)
    for batch in batches:
        inputs = engine.loaded.collate(batch, torch.device("cpu"))
        positions, deltas = Glm4vDecoder.rope_positions(decoder, inputs)
        expected, expected_deltas = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
        real = inputs["attention_mask"].bool()[None].expand(3, -1, -1)  # pads' positions are not used
        assert torch.equal(positions[real], expected[real])
        assert deltas == [int(d) for d in expected_deltas.view(-1)]
