"""Hostile images against a real `serve run`, all at once, next to well-formed requests: gzip bombs
behind image URLs, small PNGs that decode to hundreds of megabytes, images right at the pixel limit,
IPv6 forms that carry a loopback address, and upstream errors that would map what the server can
reach. The well-formed requests all get their answers, every attack gets its OpenAI-shaped 400,
and the ImagePreprocessor replica's peak memory stays within what its decode budget allows.

DNS rebinding cannot be shown against a real server without a DNS server of our own; the fetcher's
tests (tests/engine/images/test_fetch_attacks.py) show it with a resolver the test controls.
"""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI
from PIL import Image

from serve_app.settings import ImageSettings
from tests.integration.test_faults import image_part, openai_shaped, record, replica_pids
from tests.support.images import MODEL, ImageServer, data_url, gzip_bomb, pixel_bomb, png_bytes
from tests.support.serving import ServeProcess, config_for_tests, free_port, start_server

pytestmark = pytest.mark.integration

HOSTILE_HOST = "127.0.0.2"  # allowed, as a public host would be; 127.0.0.1 stays forbidden
SETTINGS = ImageSettings()  # the defaults are what is under test: the pixel limit and the decode budget
MIB = 1 << 20
# Besides decoding (at most ~9.5 bytes per pixel of the budget, see test_decode_bounds.py), a
# replica holds requests, fetch buffers (5 MB each at most), the model processor's arrays, and
# what the allocator keeps of freed memory per thread.
OTHER_MEMORY = 256 * MIB


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak_rss(pid: int) -> None:
    """Linux: writing 5 to clear_refs sets the peak RSS (VmHWM) back to the current RSS."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")


def photo_jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, "JPEG", quality=60)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile() -> Iterator[ImageServer]:
    srv = ImageServer(host=HOSTILE_HOST)
    srv.files["/ok.png"] = (png_bytes((80, 60), (20, 160, 40)), "image/png")
    srv.files["/photo.jpg"] = (photo_jpeg((6000, 4000)), "image/jpeg")  # 24 M pixels, decoded at 1/4
    srv.files["/bomb.png"] = (gzip_bomb(600 * MIB), "image/png")
    srv.headers["/bomb.png"] = {"Content-Encoding": "gzip, gzip"}
    for status in (404, 500):
        srv.statuses[f"/status/{status}"] = status
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    config = config_for_tests(
        free_port(),
        overrides={"images": {"allowed_hosts": [HOSTILE_HOST], "connect_timeout_s": 2, "read_timeout_s": 5}},
        # One preprocessor replica, so that every image goes through the replica whose memory is measured.
        deployments={"ImagePreprocessor": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}},
    )
    process = start_server(tmp_path_factory.mktemp("image-attacks"), config)
    yield process
    process.stop()


def ask(client: OpenAI, url: str, label: str) -> tuple[int, dict | None]:
    """One request with one image: (200, None) or (status, the error object)."""
    content = [{"type": "text", "text": f"What is in picture {label}?"}, image_part(url)]
    try:
        reply = client.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": content}])
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body if isinstance(exc.body, dict) else {"unshaped": str(exc.body)}
    assert reply.choices[0].finish_reason in ("stop", "length")
    return 200, None


def test_hostile_images_are_refused_in_bounded_memory_while_others_get_answers(
    server: ServeProcess, hostile: ImageServer
) -> None:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=180)
    [preprocessor] = replica_pids(server, "ImagePreprocessor")
    side = int(SETTINGS.decoded_pixel_limit**0.5)
    port = free_port()
    attacks = {
        # label: (image URL, the error code it must get)
        **{f"gzip bomb {i}": (hostile.url("/bomb.png"), "image_fetch_failed") for i in range(4)},
        **{f"pixel bomb {i}": (data_url(pixel_bomb((6300, 6300 - i), "RGBA")), "image_too_large") for i in range(4)},
        "NAT64 of loopback": (f"http://[64:ff9b::7f00:1]:{port}/a.png", "image_url_forbidden"),
        "6to4 of loopback": (f"http://[2002:7f00:1::]:{port}/a.png", "image_url_forbidden"),
        "IPv4-compatible loopback": (f"http://[::7f00:1]:{port}/a.png", "image_url_forbidden"),
        "upstream 404": (hostile.url("/status/404"), "image_fetch_failed"),
        "upstream 500": (hostile.url("/status/500"), "image_fetch_failed"),
    }
    well_formed = {
        # Right at the pixel limit: accepted, and decoded only as fast as the replica's budget allows.
        **{f"at the limit {i}": data_url(pixel_bomb((side, side - i), "RGBA")) for i in range(4)},
        **{f"small {i}": data_url(png_bytes((64 + i, 48), (200, 30 + 40 * i, 30))) for i in range(4)},
        **{f"by URL {i}": hostile.url("/ok.png") for i in range(2)},
        "large JPEG photo": hostile.url("/photo.jpg"),
    }

    reset_peak_rss(preprocessor)
    rss_before = status_kib(preprocessor, "VmRSS") * 1024
    with concurrent.futures.ThreadPoolExecutor(len(attacks) + len(well_formed) + 1) as pool:
        attacked = {label: pool.submit(ask, client, url, label) for label, (url, _) in attacks.items()}
        served = {label: pool.submit(ask, client, url, label) for label, url in well_formed.items()}
        text_only = pool.submit(lambda: client.chat.completions.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Say hello."}]))
        attacked_results = {label: f.result() for label, f in attacked.items()}
        served_results = {label: f.result() for label, f in served.items()}
        assert text_only.result().choices[0].message.content is not None
    grew = status_kib(preprocessor, "VmHWM") * 1024 - rss_before
    record(
        "Hostile images",
        f"{len(attacks)} hostile image requests (4 gzip bombs of 600 MB in ~1.5 kB, 4 PNGs of 40 M pixels in "
        "~170 kB, IPv6 forms of loopback, upstream 404/500) at once with 12 well-formed ones (4 RGBA PNGs at the "
        "16.8 M-pixel limit, a 24 M-pixel JPEG, small images, text)",
        well_formed={label: status for label, (status, _) in served_results.items()},
        refused={label: error.get("code") if error else status for label, (status, error) in attacked_results.items()},
        preprocessor_peak_rss_rise_mib=round(grew / MIB),
    )

    assert served_results == {label: (200, None) for label in well_formed}
    for label, (status, error) in attacked_results.items():
        assert status == 400 and openai_shaped(error), (label, status, error)
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error", "messages[0].content[1]", attacks[label][1]
        ), (label, error)
    # Upstream answers are not echoed: a 404 and a 500 look alike.
    assert attacked_results["upstream 404"] == attacked_results["upstream 500"]
    assert hostile.hits("/bomb.png") == 4  # the bombs really were fetched

    bound = SETTINGS.decode_pixel_budget * 9.5 + OTHER_MEMORY
    assert grew < bound, f"the preprocessor's peak RSS rose {grew / MIB:.0f} MiB (bound {bound / MIB:.0f} MiB)"
    assert replica_pids(server, "ImagePreprocessor") == [preprocessor]  # the replica lived through it
