"""Turn an `image_url` into bytes: decode data URLs, fetch http(s) URLs safely.

Fetching refuses addresses a server should never reach on a client's behalf (loopback, private,
link-local, multicast, reserved; IPv4 and IPv6, IPv4-mapped included), checks every redirect hop
again, and streams the body with a byte cap so a huge or endless response cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from urllib.parse import urljoin, urlsplit

import httpx

from serve_app.errors import ImageError
from serve_app.settings import ImageSettings

_DATA_URL = re.compile(r"^data:(?P<mime>image/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


class AddressPolicy:
    """Decides which IP addresses the server may connect to when fetching images."""

    def __init__(self, allowed: list[str]) -> None:
        self._hosts = {a.lower() for a in allowed}
        self._networks = []
        for entry in allowed:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                pass  # a host name, matched by name

    def host_allowed(self, host: str) -> bool:
        return host.lower().strip("[]") in self._hosts

    def address_allowed(self, address: _IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self._networks if net.version == address.version):
            return True
        return address.is_global and not address.is_multicast


async def resolve(host: str, port: int, param: str) -> list[_IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ImageError(f"Could not resolve the image host {host!r}.", param, code="image_fetch_failed") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def check_url(url: str, policy: AddressPolicy, param: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageError("Image URLs must be http(s) or data:image/...;base64 URLs.", param)
    if policy.host_allowed(parts.hostname):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for address in await resolve(parts.hostname, port, param):
        if not policy.address_allowed(address):
            raise ImageError(
                f"The image URL points to a non-public address ({address}), which is not allowed.",
                param,
                code="image_url_forbidden",
            )


async def fetch_url(url: str, settings: ImageSettings, client: httpx.AsyncClient, param: str) -> bytes:
    """GET an image with bounded redirects, time and size; every hop is checked against the policy.

    The name is resolved for the check and again by the connection, so a DNS answer that changes in
    between (rebinding) is not caught here; deployments that fear it should fetch through an
    egress proxy.
    """
    policy = AddressPolicy(settings.allowed_hosts)
    for _ in range(settings.max_redirects + 1):
        await check_url(url, policy, param)
        try:
            async with client.stream("GET", url) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise ImageError("The image URL redirected without a location.", param)
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise ImageError(
                        f"Fetching the image failed with HTTP status {response.status_code}.",
                        param,
                        code="image_fetch_failed",
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > settings.max_image_bytes:
                    raise ImageError(_too_large(settings), param, code="image_too_large")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > settings.max_image_bytes:
                        raise ImageError(_too_large(settings), param, code="image_too_large")
                return bytes(body)
        except httpx.TimeoutException:
            raise ImageError("Fetching the image timed out.", param, code="image_fetch_timeout") from None
        except httpx.HTTPError as exc:
            raise ImageError(f"Fetching the image failed: {type(exc).__name__}.", param, code="image_fetch_failed") from None
    raise ImageError(f"The image URL redirected more than {settings.max_redirects} times.", param, code="image_fetch_failed")


def make_client(settings: ImageSettings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
    # Redirects are followed by fetch_url itself so each hop is checked; no proxies from the env.
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                             headers={"User-Agent": "vlm-serve image fetcher"})


async def load_image_bytes(url: str, settings: ImageSettings, client: httpx.AsyncClient, param: str) -> bytes:
    if url.startswith("data:"):
        return decode_data_url(url, settings, param)
    # httpx's read timeout restarts with every chunk; a server that drips bytes is cut off here.
    try:
        async with asyncio.timeout(settings.connect_timeout_s + settings.read_timeout_s):
            return await fetch_url(url, settings, client, param)
    except TimeoutError:
        raise ImageError("Fetching the image timed out.", param, code="image_fetch_timeout") from None
