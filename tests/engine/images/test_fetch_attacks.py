"""The image fetcher attacked the ways a client can turn it on the server's own network: DNS
rebinding (with a resolver the test controls, no real DNS), IPv6 forms that carry a private IPv4
address, compression bombs, and errors that would map what the server can reach."""

from __future__ import annotations

import re
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.images.fetch import NOT_ALLOWED, NOT_FETCHED
from serve_app.errors import ImageError
from serve_app.settings import ImageSettings
from tests.support.fetching import PARAM, ControlledResolver, fetch, twin_servers
from tests.support.images import ImageServer, gzip_bomb, gzip_bytes, png_bytes
from tests.support.serving import free_port

PICTURE = png_bytes((40, 30), (0, 128, 255))
SECRET = b"internal service: not for clients"
PUBLIC = "93.184.215.14"  # a global unicast address; nothing of the test listens there
OUTSIDE = ImageSettings(allowed_hosts=["127.0.0.2"])  # 127.0.0.2 plays the public internet


# ---- DNS rebinding: the address checked is the address connected to -----------------------------


def test_a_name_that_rebinds_to_loopback_is_fetched_from_the_address_that_was_checked(
    resolver: ControlledResolver, twins: tuple[ImageServer, ImageServer]
) -> None:
    outside, internal = twins
    outside.files["/pic.png"] = (PICTURE, "image/png")
    internal.files["/pic.png"] = (SECRET, "image/png")
    resolver.answers["images.rebind.test"] = ["127.0.0.2", "127.0.0.1"]

    assert fetch(outside.url("/pic.png", host="images.rebind.test"), OUTSIDE) == PICTURE
    assert internal.hits() == 0
    assert resolver.lookups["images.rebind.test"] == 1  # resolved once: nothing asked DNS again
    assert outside.requests[-1][1]["Host"] == f"images.rebind.test:{outside.port}"  # the name, not the IP


def test_a_public_answer_then_loopback_never_reaches_loopback(
    resolver: ControlledResolver, twins: tuple[ImageServer, ImageServer]
) -> None:
    _, internal = twins
    internal.files["/pic.png"] = (SECRET, "image/png")
    resolver.answers["public.rebind.test"] = [PUBLIC, "127.0.0.1"]

    with pytest.raises(ImageError) as info:  # the public address does not answer here
        fetch(internal.url("/pic.png", host="public.rebind.test"), ImageSettings(connect_timeout_s=1, read_timeout_s=1))
    assert info.value.code == "image_fetch_failed"
    assert internal.hits() == 0
    assert resolver.lookups["public.rebind.test"] == 1


def test_every_redirect_hop_is_resolved_once_checked_and_pinned(
    resolver: ControlledResolver, twins: tuple[ImageServer, ImageServer]
) -> None:
    outside, internal = twins
    outside.files["/pic.png"] = (PICTURE, "image/png")
    internal.files["/pic.png"] = (SECRET, "image/png")
    outside.redirects["/start"] = outside.url("/pic.png", host="hop.rebind.test")
    resolver.answers["hop.rebind.test"] = ["127.0.0.2", "127.0.0.1"]

    assert fetch(outside.url("/start"), OUTSIDE) == PICTURE
    assert internal.hits() == 0
    assert resolver.lookups["hop.rebind.test"] == 1


def test_tls_to_the_pinned_address_names_the_host_for_sni_and_the_certificate(
    resolver: ControlledResolver, tmp_path: Path
) -> None:
    """The connection goes to the IP, yet TLS still sends and verifies the host's name: a
    certificate for that name is accepted, one for another name (same trusted CA) is not."""
    tls = pytest.importorskip("tests.support.tls")
    ca = tls.CertificateAuthority()
    names_outside: list[str | None] = []
    names_internal: list[str | None] = []
    servers = twin_servers((ca.server_context("tls.rebind.test", tmp_path, names_outside),
                            ca.server_context("tls.rebind.test", tmp_path, names_internal)))
    impostor = ImageServer("127.0.0.2", ssl_context=ca.server_context("someone-else.test", tmp_path))
    try:
        outside, internal = servers
        for server in (outside, impostor):
            server.files["/pic.png"] = (PICTURE, "image/png")
        internal.files["/pic.png"] = (SECRET, "image/png")
        resolver.answers["tls.rebind.test"] = ["127.0.0.2", "127.0.0.1"]
        resolver.answers["other.rebind.test"] = ["127.0.0.2"]
        assert fetch(outside.url("/pic.png", host="tls.rebind.test"), OUTSIDE, verify=ca.client_context()) == PICTURE
        assert names_outside == ["tls.rebind.test"] and names_internal == []
        assert internal.hits() == 0

        with pytest.raises(ImageError) as info:  # the certificate is checked against the name in the URL
            fetch(impostor.url("/pic.png", host="other.rebind.test"), OUTSIDE, verify=ca.client_context())
        assert info.value.code == "image_fetch_failed"
        assert impostor.hits() == 0  # refused in the handshake, before any request
    finally:
        for server in (*servers, impostor):
            server.close()


# ---- IPv6 forms that carry an IPv4 address --------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::7f00:1]:{port}/pic.png",  # NAT64 of 127.0.0.1
        "http://[64:ff9b::a00:7]:{port}/pic.png",  # NAT64 of 10.0.0.7
        "http://[64:ff9b:1::7f00:1]:{port}/pic.png",  # local-use NAT64
        "http://[2002:7f00:1::1]:{port}/pic.png",  # 6to4 of 127.0.0.1
        "http://[2002:a9fe:a9fe::]:{port}/pic.png",  # 6to4 of 169.254.169.254
        "http://[::7f00:1]:{port}/pic.png",  # IPv4-compatible 127.0.0.1
        "http://[::ffff:0:a00:1]:{port}/pic.png",  # IPv4-translated 10.0.0.1
        "http://nat64.example:{port}/pic.png",  # a name whose AAAA is NAT64 of loopback
    ],
)
def test_ipv6_forms_that_carry_a_private_ipv4_address_are_refused(url: str, resolver: ControlledResolver) -> None:
    resolver.answers["nat64.example"] = ["64:ff9b::7f00:1"]
    with pytest.raises(ImageError) as info:
        fetch(url.format(port=free_port()), ImageSettings(connect_timeout_s=1, read_timeout_s=1))
    assert (info.value.code, info.value.message, info.value.param) == ("image_url_forbidden", NOT_ALLOWED, PARAM)


# ---- compression -------------------------------------------------------------------------------


def test_a_gzip_bomb_is_refused_without_being_inflated(image_server: ImageServer) -> None:
    """Two layers of gzip over 200 MB of zeros, about a kilobyte on the wire. The fetcher asks
    for the identity encoding, reads raw bytes and refuses any other encoding: memory stays flat."""
    bomb = gzip_bomb(200 << 20)
    assert len(bomb) < 4096
    image_server.files["/bomb.png"] = (bomb, "image/png")
    image_server.headers["/bomb.png"] = {"Content-Encoding": "gzip, gzip"}

    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            fetch(image_server.url("/bomb.png"), ImageSettings(allowed_hosts=["127.0.0.1"]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == "image_fetch_failed"
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated while refusing a compressed body"
    path, headers = image_server.requests[-1]
    assert path == "/bomb.png" and headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip_bytes), ("x-gzip", gzip_bytes), ("deflate", zlib.compress)])
def test_a_compressed_image_is_refused_whatever_it_inflates_to(
    image_server: ImageServer, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    """A server that ignores `Accept-Encoding: identity` gets nothing decompressed on our side."""
    image_server.files[f"/{encoding}.png"] = (compress(PICTURE), "image/png")
    image_server.headers[f"/{encoding}.png"] = {"Content-Encoding": encoding}
    with pytest.raises(ImageError) as info:
        fetch(image_server.url(f"/{encoding}.png"), ImageSettings(allowed_hosts=["127.0.0.1"]))
    assert info.value.code == "image_fetch_failed"


# ---- errors that do not map what the server can reach ------------------------------------------


def test_every_fetch_failure_looks_the_same_to_the_client(
    image_server: ImageServer, resolver: ControlledResolver, caplog: pytest.LogCaptureFixture
) -> None:
    """Upstream statuses, refused connections, unknown names, timeouts, redirect loops and
    refused encodings all give one message and code; the reasons go to the server log."""
    for status in (401, 403, 404, 500, 502):
        image_server.statuses[f"/status/{status}"] = status
    image_server.statuses["/redirect-without-location"] = 302
    image_server.redirects["/loop"] = "/loop"
    image_server.slow["/slow.png"] = 3.0
    image_server.files["/slow.png"] = (PICTURE, "image/png")
    image_server.files["/gzipped.png"] = (gzip_bytes(PICTURE), "image/png")
    image_server.headers["/gzipped.png"] = {"Content-Encoding": "gzip"}
    resolver.unknown.add("no-such-host.test")
    settings = ImageSettings(allowed_hosts=["127.0.0.1"], connect_timeout_s=0.5, read_timeout_s=0.5)
    urls = {
        **{f"HTTP {status}": image_server.url(f"/status/{status}") for status in (401, 403, 404, 500, 502)},
        "redirect without Location": image_server.url("/redirect-without-location"),
        "redirect loop": image_server.url("/loop"),
        "timeout": image_server.url("/slow.png"),
        "gzip": image_server.url("/gzipped.png"),
        "closed port": f"http://127.0.0.1:{free_port()}/pic.png",
        "unknown name": "http://no-such-host.test/pic.png",
    }
    answers = {}
    for case, url in urls.items():
        with pytest.raises(ImageError) as info:
            fetch(url, settings)
        answers[case] = (info.value.message, info.value.code, info.value.param)

    assert set(answers.values()) == {(NOT_FETCHED, "image_fetch_failed", PARAM)}, answers
    assert not re.search(r"\d", NOT_FETCHED)
    assert "HTTP status 404" in caplog.text and "HTTP status 502" in caplog.text  # details for the operator


def test_policy_refusals_do_not_say_what_a_name_resolves_to(resolver: ControlledResolver) -> None:
    resolver.answers["intranet.example"] = ["10.20.30.40"]
    resolver.answers["metadata.example"] = ["169.254.169.254"]
    urls = ["http://10.0.0.1/a.png", "http://intranet.example/a.png", "http://metadata.example/a.png",
            "http://[::1]:8080/a.png", "http://[fd00::1]/a.png"]
    answers = set()
    for url in urls:
        with pytest.raises(ImageError) as info:
            fetch(url, ImageSettings())
        answers.add((info.value.message, info.value.code))
    assert answers == {(NOT_ALLOWED, "image_url_forbidden")}
