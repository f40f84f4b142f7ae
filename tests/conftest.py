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


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """The default application (serve_config.yaml) on a free port, shared by the session."""
    process = start_server(tmp_path_factory.mktemp("serve"), config_for_tests(free_port()))
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(server: ServeProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    srv = ImageServer()
    yield srv
    srv.close()
