"""The chat page at `/`, driven in Debian's headless Chromium against a real `serve run`.

A person opens the page, drops or picks an image, asks, watches the answer stream, asks a follow-up,
stops a long answer, clears, and meets errors; these tests do the same through Playwright. The
browser talks to the real server on 127.0.0.1, except where a test needs an answer the demo model
cannot give (HTML in the answer, a 429, sample images): those intercept one URL in the browser.

Screenshots of the main states go to `test-artifacts/web/`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support import serving
from tests.support.images import MODEL, png_bytes
from tests.support.serving import ROOT, ServeProcess

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need `pip install playwright`")
expect = sync_api.expect

pytestmark = pytest.mark.integration

# The helper that writes a test config (named test_config in older checkouts).
config_for_tests = getattr(serving, "config_for_tests", None) or serving.test_config

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHAT = "/v1/chat/completions"
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"the browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True
    )


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # only this run's screenshots
    ARTIFACTS.mkdir(parents=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


class ChatPage:
    """One browser tab on the chat page, with the chat requests it sent and the errors it logged."""

    def __init__(self, browser: Any, base_url: str, viewport: dict[str, int] = WIDE, dark: bool = False) -> None:
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

    def bodies(self) -> list[dict]:
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


@pytest.fixture
def chat(browser: Any, server: ServeProcess) -> Iterator[ChatPage]:
    page = ChatPage(browser, server.base_url).open()
    yield page
    page.assert_clean()
    page.close()


def jpeg_bytes(size: tuple[int, int] = (80, 60), color: tuple[int, int, int] = (30, 60, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def image_urls(message: dict) -> list[str]:
    content = message["content"]
    return [] if isinstance(content, str) else [p["image_url"]["url"] for p in content if p["type"] == "image_url"]


def sse(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]
    body = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": choices}
    if usage:
        body["usage"] = usage
    return body


# ---- the page and its assets -----------------------------------------------------------------


def test_page_loads_with_models_and_labelled_controls(chat: ChatPage, server: ServeProcess) -> None:
    page = chat.page
    chat.wait_for_models()
    served = [m["id"] for m in page.evaluate("fetch('/v1/models').then(r => r.json())")["data"]]
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == served
    assert page.input_value("#model") == served[0]
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#samples")).to_be_visible()  # the generator's samples ship with the page
    expect(page.locator("#stop")).to_be_hidden()

    # Every control has an accessible name (a <label>, aria-label or its own text).
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, input, select, textarea')]
            .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                           && !e.textContent.trim() && e.type !== 'hidden')
            .map((e) => e.outerHTML)"""
    )
    assert unnamed == []
    # Keyboard: the skip link leads to the message box.
    page.keyboard.press("Tab")
    expect(page.locator(".skip-link")).to_be_focused()
    chat.shot("01-empty")

    # Assets are shipped in the package with the right types; the page forbids inline scripts.
    response = page.request.get("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert page.request.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert page.request.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert page.request.get("/static/nope.js").status == 404
    assert page.request.get("/static/%2e%2e/web.py").status == 404
    assert page.request.get("/static/samples/index.json").status == 200


def test_picked_image_streams_an_answer_and_the_follow_up_carries_the_history(chat: ChatPage) -> None:
    page = chat.page
    chat.wait_for_models()
    chat.set_max_tokens(160)
    page.click("text=Advanced")
    page.check("#ignore-eos")  # a fixed length: long enough to watch it stream
    red = png_bytes((64, 48), (200, 30, 30))
    page.set_input_files("#file-input", files=[{"name": "red.png", "mimeType": "image/png", "buffer": red}])
    expect(page.locator(".attachment")).to_have_count(1)
    expect(page.get_by_role("button", name="Remove image red.png")).to_be_visible()
    page.fill("#prompt", "What colour is this square?")
    chat.shot("02-image-attached")

    # Record the answer's length each time the page redraws it: a streamed answer grows in steps.
    page.evaluate(
        """() => { window.__lengths = []; new MutationObserver(() => {
                const body = document.querySelector('.turn.assistant:last-child .answer-body .md-text');
                if (body) window.__lengths.push(body.textContent.length);
            }).observe(document.getElementById('log'), { childList: true, subtree: true, characterData: true }); }"""
    )
    page.press("#prompt", "Enter")
    expect(page.locator("#stop")).to_be_visible()
    answer = chat.wait_answer("done")
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3, lengths
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator(".attachment")).to_have_count(0)
    stats = answer.locator(".answer-stats").inner_text()
    assert re.search(r"first token \d+ ms", stats), stats
    assert re.search(r"[\d.]+ tokens/s", stats), stats
    assert re.search(r"\d+ prompt \+ 160 completion = \d+ tokens", stats), stats
    first_text = answer.locator(".answer-body").inner_text()
    assert first_text.strip()
    chat.shot("03-streamed-answer")

    (first,) = chat.bodies()
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert first["max_tokens"] == 160 and first["ignore_eos"] is True and first["model"] == page.input_value("#model")
    assert image_urls(first["messages"][-1]) == [f"data:image/png;base64,{base64.b64encode(red).decode()}"]
    assert chat.requests[0].headers.get("authorization") is None  # no key set: no header

    # The copy button puts the raw answer on the clipboard.
    answer.get_by_role("button", name="Copy answer").click()
    expect(answer.get_by_role("button", name="Copy answer")).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.strip() and copied.split()[0] in first_text

    # Second turn: an image dropped on the page, Shift+Enter for a second line, Enter sends.
    page.uncheck("#ignore-eos")
    chat.set_max_tokens(16)
    blue = jpeg_bytes()
    chat.drop([("blue.jpg", "image/jpeg", blue)])
    expect(page.locator(".attachment")).to_have_count(1)
    expect(page.locator("#drop-overlay")).to_be_hidden()
    page.fill("#prompt", "And this one?")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("Compare it with the first image.")
    assert page.input_value("#prompt") == "And this one?\nCompare it with the first image."
    assert len(chat.requests) == 1  # Shift+Enter did not send
    page.press("#prompt", "Enter")
    chat.wait_answer("done")
    expect(page.locator(".turn.user")).to_have_count(2)

    second = chat.bodies()[1]
    user1, assistant1, user2 = second["messages"]
    assert user1 == first["messages"][-1]  # the first turn, its image included
    assert assistant1["role"] == "assistant" and assistant1["content"] == copied
    assert image_urls(user2) == [f"data:image/jpeg;base64,{base64.b64encode(blue).decode()}"]
    assert user2["content"][-1] == {"type": "text", "text": "And this one?\nCompare it with the first image."}


def test_paste_attaches_images_and_clear_starts_over(chat: ChatPage) -> None:
    page = chat.page
    chat.wait_for_models()
    chat.set_max_tokens(8)
    page.focus("#prompt")
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'image.png', { type: 'image/png' }));
            document.getElementById('prompt').dispatchEvent(
                new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));
        }""",
        base64.b64encode(png_bytes()).decode(),
    )
    expect(page.locator(".attachment")).to_have_count(1)
    # Several images per turn, and each can be removed again.
    page.set_input_files(
        "#file-input",
        files=[
            {"name": "a.png", "mimeType": "image/png", "buffer": png_bytes(color=(10, 200, 10))},
            {"name": "b.webp", "mimeType": "image/webp", "buffer": _webp()},
            {"name": "c.gif", "mimeType": "image/gif", "buffer": _gif()},
        ],
    )
    expect(page.locator(".attachment")).to_have_count(4)
    page.get_by_role("button", name="Remove image a.png").click()
    expect(page.locator(".attachment")).to_have_count(3)
    chat.ask("Describe these.")
    chat.wait_answer("done")
    assert [u.split(";")[0] for u in image_urls(chat.bodies()[0]["messages"][-1])] == [
        "data:image/png",
        "data:image/webp",
        "data:image/gif",
    ]

    page.click("#clear")
    expect(page.locator("#log > li")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#prompt")).to_be_focused()
    chat.ask("A fresh start.")
    chat.wait_answer("done")
    assert len(chat.bodies()[1]["messages"]) == 1  # nothing of the cleared conversation


def _webp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (120, 120, 0)).save(buffer, "WEBP")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (40, 40), 3).save(buffer, "GIF")
    return buffer.getvalue()


def cancelled_lines(server: ServeProcess) -> list[str]:
    """The model replica's lines about dropping a cancelled request (lower case: Ray's access log
    writes CANCELLED for any call whose caller went away, which proves nothing about the model)."""
    return [line for line in server.log().splitlines() if "cancelled" in line and "VLMServer" in line]


def test_stop_ends_the_stream_and_the_generation_on_the_server(chat: ChatPage, server: ServeProcess) -> None:
    page = chat.page
    chat.wait_for_models()
    cancelled_before = len(cancelled_lines(server))
    chat.set_max_tokens(2000)
    page.click("text=Advanced")
    page.check("#ignore-eos")  # the extension field: the demo model must not end on its own
    chat.ask("Tell me a very long story.")
    answer = chat.last_answer()
    expect(answer.locator(".answer-body .md-text").first).to_have_text(re.compile(r"\S"), timeout=30_000)
    page.wait_for_timeout(300)  # a few more tokens
    page.click("#stop")
    answer = chat.wait_answer("stopped", timeout=10_000)
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()
    assert "stopped" in answer.locator(".answer-stats").inner_text()
    text_at_stop = answer.locator(".answer-body").inner_text()
    page.wait_for_timeout(500)
    assert answer.locator(".answer-body").inner_text() == text_at_stop  # nothing arrives any more
    answer.get_by_role("button", name="Copy answer").click()
    partial = page.evaluate("navigator.clipboard.readText()")
    assert partial.strip()
    body = chat.bodies()[0]
    assert body["max_tokens"] == 2000 and body["ignore_eos"] is True

    # The closed connection reaches the model replica, which drops the row from its batch.
    deadline = time.monotonic() + 20
    while len(cancelled_lines(server)) <= cancelled_before and time.monotonic() < deadline:
        time.sleep(0.25)
    new_lines = cancelled_lines(server)[cancelled_before:]
    assert new_lines, server.log()[-3000:]
    for line in new_lines:  # "... after N tokens", when the replica says how far it got: well short of 2000
        if m := re.search(r"after (\d+) tokens", line):
            assert int(m.group(1)) < 2000, line

    # The partial answer stays in the conversation; the next turn carries it.
    chat.set_max_tokens(4)
    page.uncheck("#ignore-eos")
    chat.ask("Go on.")
    chat.wait_answer("done")
    follow_up = chat.bodies()[1]["messages"]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    assert follow_up[1]["content"] == partial


def test_oversize_and_unsupported_files_are_refused_before_sending(chat: ChatPage) -> None:
    page = chat.page
    chat.wait_for_models()
    too_big = b"\x89PNG\r\n\x1a\n" + b"\0" * (5 * 1024 * 1024 - 7)  # 5 MB + 1 byte
    page.set_input_files("#file-input", files=[{"name": "huge.png", "mimeType": "image/png", "buffer": too_big}])
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("huge.png is too large (5,242,881 bytes); the limit is 5 MB per image.")
    expect(page.locator(".attachment")).to_have_count(0)
    chat.shot("04-oversize-refused")

    chat.drop([("notes.txt", "text/plain", b"hello")])
    expect(notice).to_contain_text("notes.txt is not a supported image type")
    expect(page.locator(".attachment")).to_have_count(0)
    page.press("#prompt", "Enter")  # nothing to send
    expect(notice).to_contain_text("Type a question or attach an image first")
    assert chat.requests == []


def test_server_errors_are_shown_inline_and_the_message_comes_back(chat: ChatPage) -> None:
    page = chat.page
    chat.wait_for_models()
    chat.set_max_tokens(99999)  # above the server's max_tokens ceiling: a real 400
    page.set_input_files("#file-input", files=[{"name": "red.png", "mimeType": "image/png", "buffer": png_bytes()}])
    chat.ask("Will this work?")
    answer = chat.wait_answer("error")
    alert = answer.get_by_role("alert")
    expect(alert).to_contain_text("The server refused the request (400)")
    expect(alert).to_contain_text("max_tokens is 99999")
    expect(page.locator(".turn.user.failed")).to_have_count(1)
    expect(page.locator("#prompt")).to_have_value("Will this work?")  # back in the box, to fix and resend
    expect(page.locator(".attachment")).to_have_count(1)
    chat.shot("05-error-400")

    chat.set_max_tokens(8)
    # Once fixed, the same message goes through, and the failed turn is not in its history.
    page.press("#prompt", "Enter")
    chat.wait_answer("done")
    assert len(chat.bodies()[-1]["messages"]) == 1


def test_model_html_is_shown_as_text_with_line_breaks_and_code_blocks(chat: ChatPage) -> None:
    page = chat.page
    chat.wait_for_models()
    evil = '<script>window.__pwned = 1</script>\n<img src=x onerror="window.__pwned = 2"><b>bold?</b>'
    pieces = [
        evil[:9],
        evil[9:30],
        evil[30:],
        "\nsecond line\n\n",
        "```html\n<script>alert(1)</script>\n",
        "<p>x</p>\n```\n",
        "and `<i>inline</i>` code.",
    ]
    body = sse(
        *(chunk(p) for p in pieces),
        chunk(finish="stop"),
        chunk(usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}),
    )
    page.route(
        f"**{CHAT}", lambda route: route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream"})
    )
    chat.ask("Say something dangerous.")
    answer = chat.wait_answer("done").locator(".answer-body")
    assert page.evaluate("window.__pwned") is None
    assert answer.locator("script, img, b, i, p:not(.md-text)").count() == 0
    first = answer.locator(".md-text").first.inner_text()
    assert first == evil + "\nsecond line"  # markup as text, line breaks kept
    code = answer.locator(".code-block")
    expect(code.locator(".code-lang")).to_have_text("html")
    expect(code.locator("pre code")).to_have_text("<script>alert(1)</script>\n<p>x</p>")
    expect(answer.locator("code.inline-code")).to_have_text("<i>inline</i>")
    expect(chat.last_answer().locator(".answer-stats")).to_contain_text("5 prompt + 7 completion = 12 tokens")
    chat.shot("06-html-as-text")

    # The render function itself, on text a stream can cut anywhere (an unterminated fence).
    html = page.evaluate(
        """async () => {
            const { renderText } = await import('/static/app.js');
            const div = document.createElement('div');
            div.append(renderText('<img src=x onerror=alert(1)>\\n```js\\nlet a = "<b>";'));
            return div.innerHTML;
        }"""
    )
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'let a = "&lt;b&gt;";' in html


def test_sample_images_from_the_generator_are_offered(chat: ChatPage) -> None:
    page = chat.page
    first = json.loads((ROOT / "serve_app" / "web" / "static" / "samples" / "index.json").read_text())["samples"][0]
    sample = page.get_by_role("button", name=re.compile(f"Attach sample image: {re.escape(first['title'])}"))
    expect(sample).to_be_visible()
    chat.shot("07-samples")
    sample.click()
    expect(page.locator(".attachment")).to_have_count(1)
    expect(page.locator("#prompt")).to_have_value(first["prompt"])


def test_phone_width(browser: Any, server: ServeProcess) -> None:
    chat = ChatPage(browser, server.base_url, viewport=PHONE, dark=True).open()
    page = chat.page
    chat.wait_for_models()
    expect(page.locator("#settings")).to_be_hidden()
    expect(page.locator("#prompt")).to_be_visible()
    expect(page.locator("#send")).to_be_in_viewport()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.click("#settings-toggle")
    expect(page.locator("#settings")).to_be_visible()
    expect(page.locator("#settings-toggle")).to_have_attribute("aria-expanded", "true")
    chat.set_max_tokens(24)
    chat.shot("08-phone-dark-settings")
    page.keyboard.press("Escape")
    expect(page.locator("#settings")).to_be_hidden()
    page.set_input_files(
        "#file-input", files=[{"name": "red.png", "mimeType": "image/png", "buffer": png_bytes((320, 240))}]
    )
    chat.ask("What is this?")
    chat.wait_answer("done")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    chat.shot("09-phone-dark-answer")
    chat.assert_clean()
    chat.close()


def test_static_files_stay_inside_the_static_folder() -> None:
    from serve_app.web.router.router import router as web
    from starlette.exceptions import HTTPException

    assert web._file("index.html") == web.STATIC_DIR.resolve() / "index.html"
    for name in ("../web.py", "../../pyproject.toml", "/etc/passwd", "samples/../../web.py", ".hidden", ""):
        with pytest.raises(HTTPException):
            web._file(name)


# ---- API keys: a second server with auth on ----------------------------------------------------


KEY = "sk-test-123"
LIMITED_KEY = "sk-limited-456"  # one request a minute
BODY_CAP = 400_000


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A second server with API keys, a rate-limited key and a small request-body cap."""
    ingress = {
        "api_keys": [KEY, {"name": "limited", "key": LIMITED_KEY, "requests_per_minute": 1}],
        "max_request_bytes": BODY_CAP,
    }
    config = config_for_tests(serving.free_port(), overrides={"ingress": ingress})
    try:
        process = serving.start_server(
            tmp_path_factory.mktemp("serve-auth"),
            config,
            ready_check_headers={"Authorization": f"Bearer {KEY}"},
        )
    except RuntimeError as exc:
        # Skip only when the config itself is refused (a checkout without these settings); a server
        # that fails or is slow to start is a failure.
        message = str(exc)
        if "Extra inputs are not permitted" in message and any(
            name in message for name in ("api_keys", "max_request_bytes", "requests_per_minute")
        ):
            pytest.skip(f"this checkout's server does not take API keys, rate limits and a body cap: {message[-400:]}")
        raise
    yield process
    process.stop()


def noise_png(size: tuple[int, int]) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def test_wrong_key_too_large_and_rate_limited_errors_are_shown_inline(browser: Any, auth_server: ServeProcess) -> None:
    chat = ChatPage(browser, auth_server.base_url).open()
    page = chat.page
    page.fill("#api-key", "sk-wrong")
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model-status")).to_contain_text("401")  # the model list needs the key too
    chat.set_max_tokens(8)
    chat.ask("Hello?")
    alert = chat.wait_answer("error").get_by_role("alert")
    expect(alert).to_contain_text("Authentication failed (401)")
    expect(alert).to_contain_text("Check the API key in Settings")
    assert chat.requests[-1].headers["authorization"] == "Bearer sk-wrong"
    chat.shot("10-error-401")

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    chat.wait_for_models()
    expect(page.locator("#model-status")).not_to_have_class(re.compile("error"))
    page.press("#prompt", "Enter")  # the failed message came back to the box
    chat.wait_answer("done")
    assert chat.requests[-1].headers["authorization"] == f"Bearer {KEY}"

    # An image under the page's 5 MB check whose request is over this server's body cap: 413.
    page.set_input_files(
        "#file-input", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": noise_png((400, 300))}]
    )
    chat.ask("And this?")
    alert = chat.wait_answer("error").get_by_role("alert")
    expect(alert).to_contain_text("Too large (413)")
    expect(alert).to_contain_text("Send fewer or smaller images")
    page.click("#clear")

    # A key allowed one request a minute: the second is refused with the time to wait.
    page.fill("#api-key", LIMITED_KEY)
    page.dispatch_event("#api-key", "change")
    chat.ask("One.")
    chat.wait_answer("done")
    chat.ask("Two.")
    alert = chat.wait_answer("error").get_by_role("alert")
    expect(alert).to_contain_text("Too many requests (429)")
    expect(alert).to_contain_text(re.compile(r"You can retry in \d+ s"))
    chat.shot("11-error-429")

    page.reload()  # the key is kept in this browser
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#api-key")).to_have_value(LIMITED_KEY)
    chat.assert_clean()
    chat.close()
