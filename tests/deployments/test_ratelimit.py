"""The RateLimiter deployment class and the ingress's gate in front of it, without a cluster.

The deployment class is called the way Serve's thread pool would call sync methods: from many threads
at once. The gate talks to the real deployment class through a stand-in for Serve's handle (the
transport only), which can also play a replica that is dead or never answers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from ray.exceptions import ActorDiedError

from deployments.rate_budget import RateLimitGate
from deployments.ratelimit import RateLimiter
from serve_app.errors import RateLimitError, ServiceUnavailableError
from serve_app.openai.auth import Principal
from serve_app.settings import RateLimitSettings
from serve_app.stage_types import GenerationChunk
from tests.support.concurrency import admit_from_threads
from tests.support.concurrency import tiny_switch_interval as switching_often


def run(result: Any) -> Any:
    """A method's result, run to completion in this thread's own event loop if it is a coroutine."""
    return asyncio.run(result) if inspect.isawaitable(result) else result


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    with switching_often():
        yield



async def read_then_leave(budget, stream, n: int) -> None:
    """Read `budget.metered(stream, n)` as a client that goes away after 50 ms, then let the settle run."""

    async def respond() -> None:
        async for _ in budget.metered(stream, n):
            pass

    async with anyio.create_task_group() as group:
        group.start_soon(respond)
        await asyncio.sleep(0.05)
        group.cancel_scope.cancel()
    await asyncio.sleep(0.05)  # the background settle

def test_the_deployment_holds_its_limit_when_called_from_many_threads(tiny_switch_interval: None) -> None:
    """Called from 32 threads at once, as Serve's thread pool runs sync methods: exactly the limit is
    admitted, and no call fails (a failure would reach the client as a 500)."""
    limits = RateLimitSettings(requests_per_minute=50, tokens_per_minute=10**9)
    for round_ in range(10):
        replica = RateLimiter.func_or_class()
        admitted, errors = admit_from_threads(lambda: run(replica.admit("key:shared", 10, limits)),
                                              lambda d: run(replica.settle("key:shared", d.reservation, 5)))
        assert not errors, (round_, errors[:3])
        assert admitted == 50, (round_, admitted)


class LocalHandle:
    """`handle.method.remote(*args)` as an awaitable, calling the deployment class in this process.
    `delay_s` plays a replica that is slow to answer, `dead` one that has died, `failing` a set of
    methods that raise."""

    def __init__(self, replica: Any, delay_s: float = 0.0, dead: bool = False, failing: tuple[str, ...] = ()) -> None:
        self.replica, self.delay_s, self.dead, self.failing = replica, delay_s, dead, failing
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        outer = self

        class Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                return outer._call(name, *args)

        return Method()

    async def _call(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        if self.dead:
            raise ActorDiedError()
        await asyncio.sleep(self.delay_s)
        if name in self.failing:
            raise RuntimeError(f"{name} failed on the replica")
        return await getattr(self.replica, name)(*args)


LIMITS = RateLimitSettings(requests_per_minute=100, tokens_per_minute=10_000)
ALICE = Principal(name="key:alice", authenticated=True, limits=LIMITS)


def gate_for(handle: LocalHandle, **settings: Any) -> RateLimitGate:
    return RateLimitGate(handle, RateLimitSettings(**{**LIMITS.model_dump(), **settings}))  # type: ignore[arg-type]


async def remaining_tokens(handle: LocalHandle, who: Principal = ALICE) -> int:
    """What the budget has left, read by a zero-token admission on the replica itself."""
    decision = await handle.replica.admit(who.name, 0, who.limits)
    return decision.tokens.remaining


def test_a_limiter_that_never_answers_gets_a_fast_503_with_retry_after() -> None:
    gate = gate_for(LocalHandle(RateLimiter.func_or_class(), delay_s=3600), limiter_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as refused:
        asyncio.run(gate.admit(ALICE, 100))
    assert time.monotonic() - started < 2.0
    assert refused.value.status_code == 503 and refused.value.code == "service_unavailable"
    assert int(refused.value.headers()["Retry-After"]) >= 1


def test_a_dead_limiter_gets_a_503_at_once_or_admits_unmetered_when_failing_open() -> None:
    dead = LocalHandle(RateLimiter.func_or_class(), dead=True)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(gate_for(dead).admit(ALICE, 100))
    assert time.monotonic() - started < 0.5

    async def fail_open() -> None:
        budget = await gate_for(dead, fail_open=True).admit(ALICE, 100)
        assert budget.headers == {}
        budget.settle()  # nothing reserved: nothing to send
        await asyncio.sleep(0.05)

    dead.calls.clear()
    asyncio.run(fail_open())
    assert dead.calls == ["admit"]


def test_a_refusal_is_a_429_with_the_budget_headers() -> None:
    handle = LocalHandle(RateLimiter.func_or_class())
    gate = gate_for(handle, requests_per_minute=1)
    one = Principal(name="key:one", authenticated=True, limits=RateLimitSettings(requests_per_minute=1))

    async def twice() -> None:
        first = await gate.admit(one, 10)
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(RateLimitError) as refused:
            await gate.admit(one, 10)
        assert refused.value.status_code == 429 and int(refused.value.headers()["Retry-After"]) >= 59
        assert refused.value.headers()["x-ratelimit-limit-requests"] == "1"

    asyncio.run(twice())


async def model_stream(tokens: int, then_wait: bool, prompt_tokens: int = 20) -> AsyncIterator[GenerationChunk]:
    for n in range(1, tokens + 1):
        done = n == tokens and not then_wait
        yield GenerationChunk(
            "x", prompt_tokens=prompt_tokens, completion_tokens=n, finish_reason="length" if done else None
        )
        await asyncio.sleep(0)
    if then_wait:
        await asyncio.sleep(3600)  # a long answer, cut before it ends


def test_a_stream_cut_in_a_cancelled_scope_is_settled_with_what_it_used() -> None:
    """The client goes away mid-answer: Starlette cancels the response's task group, and every await
    in that scope is cancelled again. The settle still reaches the limiter, with the tokens used so far
    (20 prompt + 5 generated), not the 3000 reserved."""
    handle = LocalHandle(RateLimiter.func_or_class())
    gate = gate_for(handle)

    async def scenario() -> None:
        budget = await gate.admit(ALICE, 3000)
        assert await remaining_tokens(handle) == 10_000 - 3000

        await read_then_leave(budget, model_stream(5, then_wait=True), 1)
        assert await remaining_tokens(handle) == 10_000 - 25

    asyncio.run(scenario())


def test_a_finished_stream_is_settled_at_its_last_chunk_even_if_never_closed() -> None:
    handle = LocalHandle(RateLimiter.func_or_class())
    gate = gate_for(handle)

    async def scenario() -> None:
        budget = await gate.admit(ALICE, 3000)
        stream = budget.metered(model_stream(7, then_wait=False, prompt_tokens=30), 1)
        for _ in range(7):
            await anext(stream)  # the consumer stops at the finish chunk, as the ingress does
        await asyncio.sleep(0.05)
        assert await remaining_tokens(handle) == 10_000 - 37
        budget.settle()  # the handler's own settle afterwards: already done, nothing sent
        await asyncio.sleep(0.05)
        assert handle.calls.count("settle") == 1
        await stream.aclose()

    asyncio.run(scenario())


async def choices_stream(
    plan: list[tuple[int, int, bool]], then_wait: bool, prompt_tokens: int = 20
) -> AsyncIterator[GenerationChunk]:
    """The chunks of a request of several choices, interleaved as `plan` says: (choice, its completion
    tokens so far, whether this is its last chunk) for each."""
    for choice, tokens, last in plan:
        yield GenerationChunk("x", prompt_tokens=prompt_tokens, completion_tokens=tokens,
                              finish_reason="stop" if last else None, choice=choice)
        await asyncio.sleep(0)
    if then_wait:
        await asyncio.sleep(3600)


# Three choices, interleaved; choice 1 finishes first (at 2 tokens), then 0 (at 4), then 2 (at 3).
THREE_CHOICES = [(0, 1, False), (1, 1, False), (2, 1, False), (1, 2, True), (0, 2, False), (2, 2, False),
                 (0, 3, False), (0, 4, True), (2, 3, True)]


def test_a_stream_of_n_choices_is_settled_once_all_have_finished_with_the_prompt_once() -> None:
    """Settled at the last choice's finish, not the first's, with 20 prompt + (4 + 2 + 3) generated."""
    handle = LocalHandle(RateLimiter.func_or_class())
    gate = gate_for(handle)

    async def scenario() -> None:
        budget = await gate.admit(ALICE, 3000)
        stream = budget.metered(choices_stream(THREE_CHOICES, then_wait=True), 3)
        for _ in range(len(THREE_CHOICES) - 1):
            await anext(stream)  # every choice but the last has finished
        await asyncio.sleep(0.05)
        assert handle.calls.count("settle") == 0
        await anext(stream)
        await asyncio.sleep(0.05)
        assert handle.calls.count("settle") == 1
        assert await remaining_tokens(handle) == 10_000 - (20 + 4 + 2 + 3)
        await stream.aclose()

    asyncio.run(scenario())


def test_a_stream_of_n_choices_cut_after_one_finished_is_settled_with_every_choice_so_far() -> None:
    """The client leaves once choice 1 has finished: the settle counts the prompt once and what each of
    the three choices had generated by then (2 + 2 + 1), in a cancelled scope as Starlette leaves it."""
    handle = LocalHandle(RateLimiter.func_or_class())
    gate = gate_for(handle)

    async def scenario() -> None:
        budget = await gate.admit(ALICE, 3000)

        await read_then_leave(budget, choices_stream(THREE_CHOICES[:5], then_wait=True), 3)
        assert handle.calls.count("settle") == 1
        assert await remaining_tokens(handle) == 10_000 - (20 + 2 + 2 + 1)

    asyncio.run(scenario())


@pytest.fixture
def serve_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of Ray Serve's logger, which does not propagate to the root logger."""
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="ray.serve")
    try:
        yield caplog
    finally:
        serve_logger.removeHandler(caplog.handler)


async def answer_then_settle(handle: LocalHandle, hang_from_now: bool) -> float:
    """Admit, stream a whole answer, settle: the seconds the request itself spent after admission."""
    budget = await gate_for(handle).admit(ALICE, 500)
    if hang_from_now:
        handle.delay_s = 3600  # the replica stops answering
    started = time.monotonic()
    async for _ in budget.metered(model_stream(3, then_wait=False), 1):
        pass
    budget.settle()
    spent = time.monotonic() - started
    await asyncio.sleep(0.05)  # the background settle runs, and fails or hangs
    return spent


def test_a_settle_that_fails_never_reaches_the_answer(serve_log: pytest.LogCaptureFixture) -> None:
    spent = asyncio.run(answer_then_settle(LocalHandle(RateLimiter.func_or_class(), failing=("settle",)), False))
    assert spent < 0.5
    assert "could not settle" in serve_log.text


def test_a_settle_that_hangs_never_holds_the_answer() -> None:
    assert asyncio.run(answer_then_settle(LocalHandle(RateLimiter.func_or_class()), True)) < 0.5
