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


def stream_through_replica(interval_s: float, chunks: int = 20, every_s: float = 0.005):
    """What `_stream` yields for a stream fed one chunk every `every_s` seconds (as the
    engine thread feeds it), with `stream_interval_s=interval_s`; and how long after the last chunk
    the stream ended."""
    import asyncio
    import time

    from deployments.vlm import _BATCH_DONE, VLMServer, _Stream

    async def main():
        server = VLMServer.func_or_class.__new__(VLMServer.func_or_class)  # no Ray: only the streaming parts
        server._stream_interval_s = interval_s
        stream = _Stream()
        fed_last_at: list[float] = []

        async def admit(_prepared):
            return stream

        async def feed() -> None:
            for n in range(1, chunks + 1):
                await asyncio.sleep(every_s)
                stream.put(chunk(str(n % 10), n, "length" if n == chunks else None))
            fed_last_at.append(time.monotonic())
            stream.put(_BATCH_DONE)

        server._admit_batch = admit
        feeding = asyncio.create_task(feed())
        out = [item async for item in server._stream(None)]
        await feeding
        return out, time.monotonic() - fed_last_at[0]

    return asyncio.run(main())


def test_a_stream_interval_gathers_tokens_but_never_holds_back_the_first_or_the_end() -> None:
    every, gathered = stream_through_replica(0.0), stream_through_replica(0.05)
    for out, _ in (every, gathered):
        assert "".join(c.text for c in out) == "".join(str(n % 10) for n in range(1, 21))
        assert out[-1].completion_tokens == 20 and out[-1].finish_reason == "length"
    assert len(every[0]) == 20  # the loop keeps up: one item per token
    assert gathered[0][0] == chunk("1", 1)  # the first token alone, at once
    assert 2 <= len(gathered[0]) <= 6  # ~100 ms of tokens in chunks of ~50 ms
    assert gathered[1] < 0.04  # the end is not held back for the interval
