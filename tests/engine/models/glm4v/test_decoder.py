"""The decoder's fused q/k/v projection: the same outputs side by side, one copy of the weights."""

from __future__ import annotations

import torch
from torch import nn

from engine.models.glm4v.decoder import fuse_linears


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
