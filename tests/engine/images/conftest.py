"""Fixtures of the fetch tests: a resolver the tests control in place of DNS, twin loopback servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.support.fetching import ControlledResolver, twin_servers
from tests.support.images import ImageServer


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> ControlledResolver:
    controlled = ControlledResolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", controlled)
    return controlled


@pytest.fixture
def twins() -> Iterator[tuple[ImageServer, ImageServer]]:
    outside, internal = twin_servers()
    yield outside, internal
    outside.close()
    internal.close()
