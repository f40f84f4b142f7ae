"""Browser fixtures: one headless Chromium for the session, and a fresh tab on the default server's
chat page per test (tests/support/page.py). Without Playwright or Debian's chromium this folder is
skipped, with the reason in the report."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("playwright.sync_api", reason="the browser tests need `pip install playwright`")

from tests.support.page import CHROMIUM, ChatPage, chromium
from tests.support.serving import ServeProcess

if not CHROMIUM.exists():
    pytest.skip(
        f"the browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True
    )


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def chat(browser: object, server: ServeProcess) -> Iterator[ChatPage]:
    """A tab on the default server's page, opened; at the end, no page error or CSP violation."""
    page = ChatPage(browser, server.base_url).open()
    yield page
    page.assert_clean()
    page.close()
