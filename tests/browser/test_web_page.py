"""The chat page at `/`, driven in Debian's headless Chromium against a real `serve run`.

A person opens the page, drops or picks an image, asks, watches the answer stream, asks a follow-up,
stops a long answer, clears, and meets errors; these tests do the same through Playwright. The
browser talks to the real server on 127.0.0.1, except where a test needs an answer the demo model
or server cannot give (HTML in the answer, two models with different generation defaults): those
intercept the URL in the browser and answer it themselves.

Screenshots of the main states go to `test-artifacts/web/`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.support import serving
from tests.support.images import png_bytes
from tests.support.page import CHAT, MODELS, PHONE, ChatPage, chunk, image_urls, sse
from tests.support.serving import ROOT, ServeProcess

pytestmark = pytest.mark.integration

STATIC = ROOT / "serve_app" / "web" / "static"
# The request fields of the page's sampling controls, and the server's other sampling defaults.
SAMPLING_FIELDS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty"}


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
    modules = sorted(p.relative_to(STATIC).as_posix() for p in (STATIC / "js").glob("*.js"))
    assert "js/main.js" in modules
    for module in modules:  # a module script served under any other type is refused by the browser
        assert page.request.get(f"/static/{module}").headers["content-type"].startswith("text/javascript"), module
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
    blue = png_bytes((80, 60), (30, 60, 200), "JPEG")
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
            {"name": "b.webp", "mimeType": "image/webp", "buffer": png_bytes((40, 40), (120, 120, 0), "WEBP")},
            {"name": "c.gif", "mimeType": "image/gif", "buffer": png_bytes((40, 40), (0, 0, 200), "GIF")},
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
            const { renderText } = await import('/static/js/render.js');
            const div = document.createElement('div');
            div.append(renderText('<img src=x onerror=alert(1)>\\n```js\\nlet a = "<b>";'));
            return div.innerHTML;
        }"""
    )
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'let a = "&lt;b&gt;";' in html


def test_sample_images_from_the_generator_are_offered(chat: ChatPage) -> None:
    page = chat.page
    first = json.loads((STATIC / "samples" / "index.json").read_text())["samples"][0]
    sample = page.get_by_role("button", name=re.compile(f"Attach sample image: {re.escape(first['title'])}"))
    expect(sample).to_be_visible()
    chat.shot("07-samples")
    sample.click()
    expect(page.locator(".attachment")).to_have_count(1)
    expect(page.locator("#prompt")).to_have_value(first["prompt"])


def test_every_sample_image_gets_its_right_answer_at_the_page_defaults(chat: ChatPage) -> None:
    """A new user's first clicks: pick a sample, send its question as the page fills it in, and read a
    right answer, with the sampling controls as the page starts them (the model's defaults)."""
    from demo.vqa_data import is_correct, web_samples

    page = chat.page
    chat.wait_for_models()
    for sample in web_samples():
        page.get_by_role("button", name=re.compile(f"Attach sample image: {re.escape(sample.question_type)}"
                                                     f" \\({sample.lang}\\)")).click()
        expect(page.locator("#prompt")).to_have_value(sample.question)
        page.press("#prompt", "Enter")
        shown = chat.wait_answer().locator(".answer-body").inner_text().strip()
        assert is_correct(shown, sample.answer), (sample.question, shown, sample.answer)
        page.click("#clear")  # the demo model answers one question about one picture at a time
    for body in chat.bodies():
        assert not {"temperature", "top_p", "max_tokens", "max_completion_tokens"} & set(body)
    chat.assert_clean()


# ---- sampling controls: the model's generation defaults -------------------------------------


def test_sampling_controls_start_from_the_served_models_defaults(chat: ChatPage) -> None:
    """The real server's `generation_defaults` on GET /v1/models: the page shows them, and leaves
    untouched controls out of the request so the server applies them itself."""
    page = chat.page
    chat.wait_for_models()
    model = next(m for m in chat.served_models() if m["id"] == page.input_value("#model"))
    defaults = model["generation_defaults"]
    assert defaults["temperature"] == 0  # the demo checkpoint answers best greedily
    expect(page.locator("#temperature-value")).to_have_text(f"{defaults['temperature']:.2f}")
    assert float(page.input_value("#temperature")) == defaults["temperature"]
    for field, selector in (("top_p", "#top-p"), ("max_tokens", "#max-tokens")):
        if defaults.get(field) is not None:
            assert float(page.input_value(selector)) == defaults[field], field
    expect(page.locator("#sampling-reset")).to_be_hidden()
    chat.shot("12-sampling-defaults")

    page.set_input_files("#file-input", files=[{"name": "red.png", "mimeType": "image/png", "buffer": png_bytes()}])
    chat.ask("What color is this?")
    chat.wait_answer("done")
    (first,) = chat.bodies()
    assert not SAMPLING_FIELDS & first.keys(), first

    # Moved by the user (with the keyboard, one step up): sent; the others still are not.
    page.focus("#temperature")
    page.keyboard.press("ArrowRight")
    stepped = round(defaults["temperature"] + 0.05, 2)
    expect(page.locator("#temperature-value")).to_have_text(f"{stepped:.2f}")
    expect(page.locator("#sampling-reset")).to_be_visible()
    chat.ask("And what shape?")
    chat.wait_answer("done")
    second = chat.bodies()[1]
    assert second["temperature"] == pytest.approx(stepped)
    assert not (SAMPLING_FIELDS - {"temperature"}) & second.keys(), second


def test_sampling_controls_follow_the_picked_model_until_the_user_changes_one(
    browser: Any, server: ServeProcess
) -> None:
    """Two models, one with defaults and one without: the demo server serves one model, so this
    test answers GET /v1/models and the chat requests in the browser."""
    served = {
        "object": "list",
        "data": [
            {
                "id": "tuned",
                "object": "model",
                "created": 0,
                "owned_by": "vlm-serve",
                "generation_defaults": {"temperature": 0.3, "top_p": 0.9, "max_tokens": 64, "top_k": 20},
            },
            {"id": "plain", "object": "model", "created": 0, "owned_by": "vlm-serve"},
        ],
    }
    answer = sse(chunk("ok"), chunk(finish="stop"))
    chat = ChatPage(browser, server.base_url)
    page = chat.page
    page.route(f"**{MODELS}", lambda route: route.fulfill(json=served))
    page.route(
        f"**{CHAT}", lambda route: route.fulfill(status=200, body=answer, headers={"Content-Type": "text/event-stream"})
    )
    chat.open()
    chat.wait_for_models()
    temperature, top_p, max_tokens = page.locator("#temperature"), page.locator("#top-p"), page.locator("#max-tokens")
    reset = page.locator("#sampling-reset")

    def ask_and_body(text: str) -> dict:
        chat.ask(text)
        chat.wait_answer("done")
        return chat.bodies()[-1]

    expect(page.locator("#temperature-value")).to_have_text("0.30")
    expect(temperature).to_have_value("0.3")
    expect(top_p).to_have_value("0.9")
    expect(max_tokens).to_have_value("64")
    expect(reset).to_be_hidden()
    body = ask_and_body("One.")
    assert body["model"] == "tuned" and not SAMPLING_FIELDS & body.keys(), body

    # A model that gives no defaults: the controls say the server decides, and nothing is sent.
    page.select_option("#model", "plain")
    expect(page.locator("#temperature-value")).to_have_text("server default")
    expect(page.locator("#top-p-value")).to_have_text("server default")
    expect(max_tokens).to_have_value("")
    body = ask_and_body("Two.")
    assert body["model"] == "plain" and not SAMPLING_FIELDS & body.keys(), body

    # A control the user moved is sent, and keeps its value when the model changes; the rest follow.
    page.fill("#temperature", "0.5")
    expect(reset).to_be_visible()
    body = ask_and_body("Three.")
    assert body["temperature"] == 0.5 and not (SAMPLING_FIELDS - {"temperature"}) & body.keys(), body
    page.select_option("#model", "tuned")
    expect(page.locator("#temperature-value")).to_have_text("0.50")
    expect(top_p).to_have_value("0.9")
    expect(max_tokens).to_have_value("64")
    body = ask_and_body("Four.")
    assert body["temperature"] == 0.5 and not (SAMPLING_FIELDS - {"temperature"}) & body.keys(), body

    # A typed max tokens is sent too; clearing the box sends none again.
    chat.set_max_tokens(12)
    assert ask_and_body("Five.")["max_tokens"] == 12
    chat.set_max_tokens(None)
    assert "max_tokens" not in ask_and_body("Six.")

    # The moved value is kept in this browser, until "Use the model's defaults" forgets it.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    chat.wait_for_models()
    expect(page.locator("#model")).to_have_value("tuned")
    expect(page.locator("#temperature-value")).to_have_text("0.50")
    reset.click()
    expect(page.locator("#temperature-value")).to_have_text("0.30")
    expect(temperature).to_have_value("0.3")
    expect(reset).to_be_hidden()
    body = ask_and_body("Seven.")
    assert not SAMPLING_FIELDS & body.keys(), body
    chat.assert_clean()
    chat.close()


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
    from starlette.exceptions import HTTPException

    from serve_app.web import router as web

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
    config = serving.config_for_tests(serving.free_port(), overrides={"ingress": ingress})
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
