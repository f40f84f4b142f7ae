"""The replica-wide pixel budget: decodes in threads never hold more pixels than it allows, heavy
images are neither starved nor run beside others, and cancelled requests keep their share until
their thread has finished."""

from __future__ import annotations

import asyncio
import random
import threading
import time

from engine.images.budget import DecodeBudget


class Decodes:
    """Stand-in decode jobs (threads that sleep or wait) that record what ran beside what."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.peak = 0
        self.started: list[tuple[str, dict[str, int]]] = []  # (job, the others running when it started)

    def job(self, name: str, pixels: int, hold: float | threading.Event) -> str:
        with self.lock:
            self.started.append((name, dict(self.running)))
            self.running[name] = pixels
            self.peak = max(self.peak, sum(self.running.values()))
        if isinstance(hold, threading.Event):
            assert hold.wait(10)
        else:
            time.sleep(hold)
        with self.lock:
            del self.running[name]
        return name


def test_pixels_decoding_at_once_never_exceed_the_budget() -> None:
    budget, decodes = DecodeBudget(100), Decodes()
    rng = random.Random(7)

    async def main() -> list[str]:
        jobs = [(f"j{i}", rng.randint(5, 60)) for i in range(40)]
        return await asyncio.gather(*(budget.run_in_thread(p, decodes.job, n, p, 0.005) for n, p in jobs))

    assert len(asyncio.run(main())) == 40
    assert 60 < decodes.peak <= 100
    assert budget.in_use == 0


def test_an_image_heavier_than_the_budget_decodes_alone_and_is_not_starved() -> None:
    budget, decodes = DecodeBudget(100), Decodes()

    async def main() -> None:
        first = asyncio.create_task(budget.run_in_thread(30, decodes.job, "first", 30, 0.05))
        await asyncio.sleep(0.01)
        heavy = asyncio.create_task(budget.run_in_thread(250, decodes.job, "heavy", 250, 0.05))
        await asyncio.sleep(0.01)
        # Light images that would fit beside "first" arrive after the heavy one: they wait behind it.
        light = [asyncio.create_task(budget.run_in_thread(10, decodes.job, f"light{i}", 10, 0.01)) for i in range(5)]
        await asyncio.gather(first, heavy, *light)

    asyncio.run(main())
    order = [name for name, _ in decodes.started]
    assert order[:2] == ["first", "heavy"]
    assert dict(decodes.started)["heavy"] == {}  # nothing else decoded beside it
    assert decodes.peak == 250 and budget.in_use == 0


def test_a_cancelled_request_keeps_its_pixels_until_its_thread_ends() -> None:
    budget, decodes = DecodeBudget(100), Decodes()
    release = threading.Event()

    async def main() -> None:
        abandoned = asyncio.create_task(budget.run_in_thread(80, decodes.job, "abandoned", 80, release))
        await asyncio.sleep(0.05)
        abandoned.cancel()  # the client went away; its thread still decodes
        await asyncio.sleep(0.01)
        assert abandoned.cancelled() and budget.in_use == 80
        waiting = asyncio.create_task(budget.run_in_thread(50, decodes.job, "next", 50, 0.0))
        await asyncio.sleep(0.05)
        assert not waiting.done() and "next" not in dict(decodes.started)
        release.set()
        assert await asyncio.wait_for(waiting, 5) == "next"

    asyncio.run(main())
    assert decodes.peak == 80 and budget.in_use == 0


def test_a_cancelled_waiter_gives_its_place_up() -> None:
    budget, decodes = DecodeBudget(100), Decodes()
    release = threading.Event()

    async def main() -> None:
        holder = asyncio.create_task(budget.run_in_thread(80, decodes.job, "holder", 80, release))
        await asyncio.sleep(0.02)
        blocked = asyncio.create_task(budget.run_in_thread(50, decodes.job, "blocked", 50, 0.0))
        await asyncio.sleep(0.01)
        behind = asyncio.create_task(budget.run_in_thread(10, decodes.job, "behind", 10, 0.0))
        await asyncio.sleep(0.02)
        assert not behind.done()  # first come, first served: it waits behind "blocked"
        blocked.cancel()
        assert await asyncio.wait_for(behind, 5) == "behind"  # 10 fits beside the 80 held
        release.set()
        await holder

    asyncio.run(main())
    assert "blocked" not in dict(decodes.started) and budget.in_use == 0
