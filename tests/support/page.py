"""The chat page driven in Debian's headless Chromium through Playwright: the browser, a page object
for one tab (`ChatPage`), and builders for the streamed answers a test serves in place of the model.

The browser tests under tests/browser use these; the server they talk to is a real `serve run`
(tests/support/serving.py).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, expect, sync_playwright

from tests.support.images import MODEL
from tests.support.serving import ROOT

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright downloads no browser
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "web"  # screenshots of the page's main states
CHAT = "/v1/chat/completions"
MODELS = "/v1/models"
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium, with this run's screenshot folder emptied first."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class ChatPage:
    """One browser tab on the chat page, with the chat requests it sent and the errors it logged."""

    def __init__(self, browser: Browser, base_url: str, viewport: dict[str, int] = WIDE, dark: bool = False) -> None:
        self.base_url = base_url
        self.context = browser.new_context(
            viewport=viewport, base_url=base_url, color_scheme="dark" if dark else "light"
        )
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        self.page = self.context.new_page()
        self.requests: list[Any] = []
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r) if r.url.endswith(CHAT) else None)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} @ {message.location.get('url', '')}")

    def open(self) -> ChatPage:
        self.page.goto("/")
        self.page.wait_for_selector("body[data-ready=true]")
        return self

    def wait_for_models(self) -> None:
        expect(self.page.locator("#model option").first).to_be_attached()

    def served_models(self) -> list[dict]:
        """The server's GET /v1/models list, fetched from the page (so with its routes and origin)."""
        return self.page.evaluate(f"fetch('{MODELS}').then(r => r.json())")["data"]

    def bodies(self) -> list[dict]:
        """The JSON bodies of the chat requests the page sent, oldest first."""
        return [json.loads(r.post_data) for r in self.requests]

    def set_max_tokens(self, n: int | None) -> None:
        self.page.fill("#max-tokens", "" if n is None else str(n))

    def ask(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def last_answer(self) -> Any:
        return self.page.locator(".turn.assistant").last

    def wait_answer(self, outcome: str = "done", timeout: float = 60_000) -> Any:
        answer = self.last_answer()
        try:
            expect(answer).to_have_class(re.compile(rf"\boutcome-{outcome}\b"), timeout=timeout)
        except AssertionError as exc:
            shown = answer.inner_text(timeout=2000) if answer.count() else "(no answer)"
            raise AssertionError(f"expected outcome-{outcome}; the answer shows: {shown!r}\n{exc}") from None
        return answer

    def shot(self, name: str, full_page: bool = False) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)

    def drop(self, files: list[tuple[str, str, bytes]], target: str = "#chat") -> None:
        """Drag files over the page and drop them, as the OS does when a user drags from a folder."""
        transfer = self.page.evaluate_handle(
            """(files) => {
                const dt = new DataTransfer();
                for (const [name, type, b64] of files) {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    dt.items.add(new File([bytes], name, { type }));
                }
                return dt;
            }""",
            [[name, mime, base64.b64encode(data).decode()] for name, mime, data in files],
        )
        self.page.dispatch_event(target, "dragenter", {"dataTransfer": transfer})
        self.page.dispatch_event(target, "dragover", {"dataTransfer": transfer})
        self.page.dispatch_event(target, "drop", {"dataTransfer": transfer})

    def assert_clean(self) -> None:
        """No uncaught exception and no Content-Security-Policy violation in the page."""
        assert not self.page_errors, self.page_errors
        assert not [e for e in self.console_errors if "Content Security Policy" in e], self.console_errors

    def close(self) -> None:
        self.context.close()


def image_urls(message: dict) -> list[str]:
    """The image URLs of one chat message, in order."""
    content = message["content"]
    return [] if isinstance(content, str) else [p["image_url"]["url"] for p in content if p["type"] == "image_url"]


def sse(*chunks: dict) -> str:
    """A chat-completions event stream of `chunks`, ended by [DONE]."""
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None, model: str = MODEL) -> dict:
    """One ChatCompletionChunk: a content piece, a finish reason, or (with `usage`) the usage chunk."""
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]
    body = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": choices}
    if usage:
        body["usage"] = usage
    return body
