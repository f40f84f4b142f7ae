"""The vision encoder's varlen attention (engine/models/glm4v/vision.py) wired into transformers.

FlashAttention's varlen kernel runs on CUDA only, so here a plain per-image SDPA stands in for the
kernel itself: what is tested is everything around it (the layout transformers hands over, the
packed images' boundaries, the output shape it expects back), on real images of different sizes
through the demo model's vision tower. The kernel's own accuracy is measured on the GPU by
benchmarks/vision_bench.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.varlen
import torch.nn.functional as F

from demo.model import make_demo_model
from engine.loader import LoadedModel, load_model
from engine.models.glm4v import vision
from serve_app.settings import ModelSettings
from tests.engine.test_engine import preprocessed

CALLS: list[int] = []


def per_image_attention(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    """What varlen_attn computes, image by image: q/k/v [tokens, heads, head_dim]."""
    CALLS.append(len(cu_seq_q) - 1)
    assert cu_seq_q.dtype == torch.int32 and max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    bounds = cu_seq_q.tolist()
    out = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale).transpose(0, 1)
           for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_demo_model(tmp_path_factory.mktemp("vision") / "ckpt")
    return load_model(ModelSettings(id="demo", path=str(path), max_model_len=512, engine="generate"))


@torch.inference_mode()
def test_varlen_attention_gives_hf_s_features_for_images_of_different_sizes(loaded, monkeypatch) -> None:
    images = [preprocessed(loaded, size, colour) for size, colour in
              (((224, 224), (255, 0, 0)), ((100, 300), (0, 255, 0)), ((56, 56), (0, 0, 255)))]
    pixels = torch.cat([image.pixel_values for image in images])
    grid = torch.tensor([image.grid_thw for image in images])
    model = loaded.model.model
    expected = torch.cat(model.get_image_features(pixels, grid).pooler_output)

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", per_image_attention)
    monkeypatch.setattr(vision, "unsupported_reason", lambda *_: None)  # the device check: CUDA only
    config = model.visual.config
    monkeypatch.setattr(config, "_attn_implementation", config._attn_implementation)  # restored afterwards
    assert vision.use_varlen_attention(loaded.model, loaded.device)
    assert config._attn_implementation == vision.VARLEN_ATTENTION
    CALLS.clear()
    got = torch.cat(model.get_image_features(pixels, grid).pooler_output)
    assert CALLS == [3] * len(model.visual.blocks)  # one call per block, all three images packed
    torch.testing.assert_close(got, expected)


def test_the_vision_tower_keeps_its_attention_where_varlen_cannot_run(loaded) -> None:
    before = loaded.model.model.visual.config._attn_implementation
    assert "CUDA" in vision.unsupported_reason(loaded.model, torch.device("cpu"))
    assert not vision.use_varlen_attention(loaded.model, torch.device("cpu"))
    assert loaded.model.model.visual.config._attn_implementation == before
