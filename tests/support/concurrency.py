"""Races made on purpose: many threads released at once, with the GIL switching as often as it can."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def tiny_switch_interval() -> Iterator[None]:
    """Threads switch every microsecond inside, so an unlocked read-modify-write races at once."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def admit_from_threads(admit: Callable[[], Any], settle: Callable[[Any], Any], threads: int = 32,
                       calls: int = 3) -> tuple[int, list[Exception]]:
    """`threads` threads released at once, each calling `admit()` (and `settle(decision)` when admitted)
    `calls` times: how many were admitted, and every exception raised (any is a finding)."""
    barrier = threading.Barrier(threads)
    admitted: list[bool] = []
    errors: list[Exception] = []

    def hammer() -> None:
        barrier.wait()
        for _ in range(calls):
            try:
                decision = admit()
                admitted.append(decision.admitted)
                if decision.admitted:
                    settle(decision)
            except Exception as exc:  # noqa: BLE001 -- any failure is the finding
                errors.append(exc)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(admitted), errors
