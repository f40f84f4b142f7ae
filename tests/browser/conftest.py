"""Browser fixtures: one headless Chromium per test module, and a fresh tab on the default server's
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


# Module scope, never session: while a browser is open Playwright's sync API keeps an event loop
# running on the main thread, and every later test that calls asyncio.run() would fail.
@pytest.fixture(scope="module")
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
