"""Fetch tests' helpers: a resolver the tests control in place of DNS, twin loopback servers, a fetch call."""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Callable

from engine.images.fetch import load_image_bytes, make_client
from serve_app.settings import ImageSettings
from tests.support.images import ImageServer

PARAM = "messages[0].content[1]"


class ControlledResolver:
    """Stands in for DNS by replacing socket.getaddrinfo, which asyncio's and anyio's lookups both
    call: a name in `answers` gets its addresses one lookup at a time (the last one from then on),
    a name in `unknown` gets the resolver's "no such name", any other name the system's answer."""

    def __init__(self, system: Callable) -> None:
        self.answers: dict[str, list[str]] = {}
        self.unknown: set[str] = set()
        self.lookups: collections.Counter[str] = collections.Counter()
        self._system = system

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name in self.unknown:
            self.lookups[name] += 1
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if name not in self.answers:
            return self._system(host, port, family, type, proto, flags)
        sequence = self.answers[name]
        address = sequence[min(self.lookups[name], len(sequence) - 1)]
        self.lookups[name] += 1
        port = int(port or 0)
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]


def twin_servers(contexts: tuple[ssl.SSLContext | None, ssl.SSLContext | None] = (None, None)) -> tuple[ImageServer, ImageServer]:
    """An image server on 127.0.0.2 and an "internal" one on 127.0.0.1 at the same port, so one URL
    reaches either, depending only on the address its name resolves to."""
    for _ in range(20):
        outside = ImageServer("127.0.0.2", ssl_context=contexts[0])
        try:
            return outside, ImageServer("127.0.0.1", port=outside.port, ssl_context=contexts[1])
        except OSError:  # that port is taken on 127.0.0.1: try another
            outside.close()
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


def fetch(url: str, settings: ImageSettings, verify: ssl.SSLContext | bool = True) -> bytes:
    async def run() -> bytes:
        async with make_client(settings, verify) as client:
            return await load_image_bytes(url, settings, client, PARAM)

    return asyncio.run(run())
