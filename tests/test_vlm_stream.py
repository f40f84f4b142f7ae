"""The model stage merges a stream's queued-up chunks into one (deployments/vlm.py `coalesce`)."""

from deployments.vlm import coalesce
from serve_app.stage_types import GenerationChunk


def chunk(text: str, n: int, finish: str | None = None) -> GenerationChunk:
    return GenerationChunk(text=text, prompt_tokens=7, completion_tokens=n, finish_reason=finish, image_tokens=4)


def test_consecutive_chunks_become_one_with_the_last_counts() -> None:
    merged = coalesce([chunk("a", 1), chunk("b", 2), chunk("c", 3, "length")])
    assert merged == [GenerationChunk("abc", 7, 3, "length", 4)]


def test_an_error_or_the_end_stays_in_its_place() -> None:
    end, error = object(), RuntimeError("the engine failed")
    assert coalesce([chunk("a", 1), chunk("b", 2), error, chunk("c", 3)]) == [chunk("ab", 2), error, chunk("c", 3)]
    assert coalesce([chunk("a", 1), end]) == [chunk("a", 1), end]
    assert coalesce([end]) == [end]


def test_a_lone_chunk_is_unchanged() -> None:
    only = chunk("x", 1)
    assert coalesce([only]) == [only]
