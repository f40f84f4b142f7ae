"""A replica-wide bound on pixels being decoded at once: a first-come, first-served semaphore
weighted by pixels.

Decoding memory grows with the pixels decoded, and one replica decodes several images at once in
threads; holding each image's pixels here while it decodes bounds the sum. An image heavier than
the whole budget waits until nothing else decodes and then decodes alone, so it is never starved
and the budget is never exceeded by more than that one image. The pixels are given back when the
decoding thread ends, not when its caller stops waiting: a cancelled request's thread keeps its
memory until it finishes, and so keeps its share of the budget.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DecodeBudget:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the decode budget needs at least one pixel")
        self.capacity = capacity
        self._free = capacity
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def in_use(self) -> int:
        return self.capacity - self._free

    async def run_in_thread(self, pixels: int, fn: Callable[..., T], *args: object) -> T:
        """Wait for `pixels` of the budget, run `fn(*args)` in a thread, give them back when it ends."""
        weight = max(1, min(pixels, self.capacity))
        await self._acquire(weight)
        try:
            future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except BaseException:
            self._release(weight)
            raise

        def finished(done: asyncio.Future[T]) -> None:
            self._release(weight)
            if not done.cancelled():
                done.exception()  # retrieved here too, for when the caller went away first

        future.add_done_callback(finished)
        return await asyncio.shield(future)

    async def _acquire(self, weight: int) -> None:
        if not self._waiters and weight <= self._free:
            self._free -= weight
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (weight, granted)
        self._waiters.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(weight)  # granted just as the caller went away
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()  # a heavy waiter at the head may have held lighter ones back
            raise

    def _release(self, weight: int) -> None:
        self._free += weight
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._free:
            weight, granted = self._waiters.popleft()
            if granted.done():
                continue
            self._free -= weight
            granted.set_result(None)
