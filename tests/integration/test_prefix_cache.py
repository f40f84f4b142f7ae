"""Prefix caching through the real server (`serve run`, the demo model on the continuous engine): a
conversation's later turns report the prompt tokens the cache held in
`usage.prompt_tokens_details.cached_tokens`, and a fresh `cache_salt` per request shares nothing;
measured by `vlm-serve bench --multi-turn`, as a user measures it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.cli import bench

pytestmark = pytest.mark.integration


def test_later_turns_report_cached_tokens_and_salted_requests_share_none(server, tmp_path: Path) -> None:
    out = tmp_path / "turns.json"
    assert bench.main([
        "--base-url", f"{server.base_url}/v1", "--multi-turn", "--turns", "3", "--num-requests", "2",
        "--concurrency", "2", "--turn-tokens", "40", "--output-tokens", "4", "--image-size", "64x64", "--warmup", "0",
        "--uncached-baseline", "--out", str(out), "--no-progress",
    ]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert (summary["failures"], summary["uncached"]["failures"]) == (0, 0)
    turns, uncached = summary["turns"], summary["uncached"]["turns"]
    assert [t["requests"] for t in turns] == [2, 2, 2]
    # Each turn's prompt begins with the last one's: most of it comes from the cache.
    assert all(t["prefix_hit_rate"] > 0.3 for t in turns[1:]), turns
    assert [t["prefix_hit_rate"] for t in uncached] == [0.0, 0.0, 0.0]
    assert [t["prompt_tokens_mean"] for t in uncached] == [t["prompt_tokens_mean"] for t in turns]
