"""Session fixtures: the default application under `serve run`, its client, a loopback image server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.support.images import ImageServer
from tests.support.serving import ServeProcess, config_for_tests, free_port, start_server


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
