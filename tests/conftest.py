"""Session fixtures: the default application under `serve run`, its client, a loopback image server."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.support.images import ImageServer
from tests.support.serving import ServeProcess, config_for_tests, free_port, start_server


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts background commands with SIGINT ignored, and children inherit
    # an ignored signal through exec: every `serve run` a test starts would then sit out the Ctrl-C that
    # stops it (tests/support/serving.py) until it is killed a minute later. A handled SIGINT is reset
    # to the default on exec, so Python in each child installs its KeyboardInterrupt handler again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def uses_default_server(item: pytest.Item) -> bool:
    """Whether a test runs on the default application: it asks for `server` (itself, or through
    `client` and the like), and its module defines no `server` of its own."""
    return "server" in getattr(item, "fixturenames", ()) and not hasattr(getattr(item, "module", None), "server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The modules on the default application run first, each whole and in the usual order otherwise,
    # so that its `serve run` stops once they are done: idle, it still takes a fifth of a core (Ray's
    # and Serve's control loops) from every test after them.
    users = {item.module for item in items if uses_default_server(item)}
    items.sort(key=lambda item: getattr(item, "module", None) not in users)


_DEFAULT: dict[str, ServeProcess] = {}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """The default application (serve_config.yaml) on a free port: started by the first module that
    asks for it, kept for the next ones, stopped after the last (the modules run together, above)."""
    process = _DEFAULT.get("server")
    if process is None:
        process = _DEFAULT["server"] = start_server(tmp_path_factory.mktemp("serve"), config_for_tests(free_port()))
    yield process
    items = request.session.items
    last = max(n for n, item in enumerate(items) if getattr(item, "module", None) is request.module)
    if not any(uses_default_server(item) for item in items[last + 1:]):
        _DEFAULT.pop("server").stop()


def pytest_sessionfinish() -> None:
    if "server" in _DEFAULT:  # the last module that asked for it never ran its tests
        _DEFAULT.pop("server").stop()


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    srv = ImageServer()
    yield srv
    srv.close()
