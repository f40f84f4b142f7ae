"""Turn an `image_url` into bytes: decode data URLs, fetch http(s) URLs safely.

Rules of the fetcher, each against a way a client could turn it on the server's own network:
- Each hop's host name is resolved once, every address it resolves to is checked against the
  `AddressPolicy`, and the connection goes to a checked address (the URL's host replaced by the IP;
  the name kept for `Host` and for TLS's SNI and certificate check). Nothing resolves the name
  again, so a DNS answer that changes between check and connect (rebinding) cannot redirect it.
  Redirects are followed here, one hop at a time, each resolved and checked the same way.
- Connections are not kept alive: a pooled TLS connection would otherwise be reused for another
  host name that resolves to the same address, without that name's certificate being checked.
- The body is asked for with `Accept-Encoding: identity` and read raw; a response with any other
  `Content-Encoding` is refused, so a few compressed bytes can never inflate into memory. The byte
  cap counts what is read, which is the image itself.
- What a client learns is one of two generic answers, "not allowed" (the policy refused an
  address) or "could not be fetched" (everything else: DNS, connection, timeout, upstream status,
  redirects, encodings), so errors do not map services the server can reach. The details go to
  the server log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
import ssl

import httpx

from engine.images.policy import AddressPolicy, IPAddress
from serve_app.errors import ImageError
from serve_app.settings import ImageSettings

__all__ = ["AddressPolicy", "decode_data_url", "load_image_bytes", "make_client"]

log = logging.getLogger(__name__)

_DATA_URL = re.compile(r"^data:(?P<mime>image/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)

NOT_ALLOWED = "The image URL is not allowed: images are fetched from public addresses only."
NOT_FETCHED = "The image could not be fetched from its URL."


def decode_data_url(url: str, settings: ImageSettings, param: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None or not match["b64"]:
        raise ImageError("Image data URLs must look like 'data:image/<type>;base64,<data>'.", param)
    if not match["mime"]:
        raise ImageError("The data URL does not declare an image media type (data:image/...).", param)
    data = match["data"]
    # base64 grows data by 4/3: refuse before decoding anything far too large.
    if len(data) * 3 // 4 > settings.max_image_bytes + 3:
        raise ImageError(_too_large(settings), param, code="image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("The image data URL is not valid base64.", param) from None
    if len(raw) > settings.max_image_bytes:
        raise ImageError(_too_large(settings), param, code="image_too_large")
    if not raw:
        raise ImageError("The image data URL is empty.", param)
    return raw


def _too_large(settings: ImageSettings) -> str:
    return f"The image is larger than the limit of {settings.max_image_bytes} bytes."


class _Refused(Exception):
    """The policy forbids an address of the URL; the reason is for the server log only."""


class _Failed(Exception):
    """The fetch produced no image body; the reason is for the server log only."""


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses, in the resolver's order, each once; an IP literal is itself."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _Failed(f"cannot resolve {host!r}: {exc}") from None
    addresses = dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos)
    if not addresses:
        raise _Failed(f"{host!r} resolves to no address")
    return list(addresses)


async def checked_addresses(url: httpx.URL, policy: AddressPolicy) -> list[IPAddress]:
    """Resolve `url`'s host once and check every address; the fetch connects only to these."""
    host = url.raw_host.decode("ascii")
    addresses = await resolve(host, url.port or (443 if url.scheme == "https" else 80))
    if not policy.host_allowed(host):
        for address in addresses:
            if not policy.address_allowed(address):
                raise _Refused(f"{host!r} resolves to the non-public address {address}")
    return addresses


async def _send_pinned(client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress]) -> httpx.Response:
    """GET `url` from the first of `addresses` that accepts a connection, naming the host as the URL does."""
    failures = []
    for address in addresses:
        request = client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers={"Host": url.netloc.decode("ascii")},
            # httpcore verifies the certificate against, and sends as SNI, this name rather than the IP.
            extensions={"sni_hostname": url.raw_host.decode("ascii")},
        )
        try:
            return await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            failures.append(f"{address}: {type(exc).__name__} {exc}")
    raise _Failed("cannot connect: " + "; ".join(failures))


async def _read_body(response: httpx.Response, settings: ImageSettings, param: str) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _Failed(f"refused Content-Encoding {encoding!r} (identity was asked for)")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_image_bytes:
        raise ImageError(_too_large(settings), param, code="image_too_large")
    body = bytearray()
    async for chunk in response.aiter_raw():  # raw: nothing is decompressed on our side
        body.extend(chunk)
        if len(body) > settings.max_image_bytes:
            raise ImageError(_too_large(settings), param, code="image_too_large")
    return bytes(body)


def _parse_url(url: str, param: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ImageError("Image URLs must be http(s) or data:image/...;base64 URLs.", param)
    return parsed


async def fetch_url(url: str, settings: ImageSettings, client: httpx.AsyncClient, param: str) -> bytes:
    """GET an image with bounded redirects and size; every hop is resolved once, checked, and pinned.

    Raises ImageError for the client's own input (not an http(s) URL, image too large), `_Refused`
    and `_Failed` for the rest; `load_image_bytes` turns those into generic client errors."""
    policy = AddressPolicy(settings.allowed_hosts)
    current = _parse_url(url, param)
    for _ in range(settings.max_redirects + 1):
        addresses = await checked_addresses(current, policy)
        response = await _send_pinned(client, current, addresses)
        try:
            if response.is_redirect:
                location = response.headers.get("location")
                if not location:
                    raise _Failed(f"HTTP {response.status_code} redirect without a Location")
                try:
                    current = current.join(location)
                except (httpx.InvalidURL, ValueError):
                    raise _Failed("redirect to an invalid Location") from None
                if current.scheme not in ("http", "https") or not current.raw_host:
                    raise _Failed(f"redirect to a {current.scheme!r} URL")
                continue
            if response.status_code != 200:
                raise _Failed(f"HTTP status {response.status_code}")
            return await _read_body(response, settings, param)
        finally:
            await response.aclose()
    raise _Failed(f"more than {settings.max_redirects} redirects")


def make_client(settings: ImageSettings, verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """The fetch client; `verify` is httpx's (certifi's CAs by default; tests pass their own CA)."""
    timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
    # Redirects are followed by fetch_url itself so each hop is checked; no proxies from the env;
    # no keep-alive (see the module docstring); only uncompressed bodies.
    return httpx.AsyncClient(
        verify=verify,
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": "vlm-serve image fetcher", "Accept-Encoding": "identity"},
    )


async def load_image_bytes(url: str, settings: ImageSettings, client: httpx.AsyncClient, param: str) -> bytes:
    if url.startswith("data:"):
        return decode_data_url(url, settings, param)
    host = _log_host(url)
    # httpx's read timeout restarts with every chunk; a server that drips bytes is cut off here.
    try:
        async with asyncio.timeout(settings.connect_timeout_s + settings.read_timeout_s):
            return await fetch_url(url, settings, client, param)
    except _Refused as exc:
        log.warning("Image fetch refused (host %s): %s", host, exc)
        raise ImageError(NOT_ALLOWED, param, code="image_url_forbidden") from None
    except (_Failed, httpx.HTTPError, TimeoutError, OSError) as exc:
        log.warning("Image fetch failed (host %s): %s", host, _describe(exc))
        raise ImageError(NOT_FETCHED, param, code="image_fetch_failed") from None


def _log_host(url: str) -> str:
    """The URL's host for the log: never its path or query, which may carry credentials."""
    try:
        return httpx.URL(url).host or "?"
    except (httpx.InvalidURL, ValueError):
        return "?"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Failed) else str(exc)
