"""API keys: where they come from, how a presented key is checked, and who it names.

Keys are configured, never written in code: inline in the config, in a file, or in an environment
variable. Each may be given in the clear or as `sha256:<hex digest>`; only digests are kept in
memory, and a presented key is compared against every digest in constant time, so neither timing
nor logs reveal a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from pydantic import SecretStr

from serve_app.errors import AuthenticationError
from serve_app.settings import ApiKey, IngressSettings, RateLimitSettings, resolve_path


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_key_line(line: str, default_name: str) -> ApiKey | None:
    """`KEY`, `NAME:KEY`, `sha256:HEX` or `NAME:sha256:HEX`; blank lines and `#` comments skip."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    name, _, rest = line.partition(":") if ":" in line and not line.startswith("sha256:") else (default_name, "", line)
    if rest.startswith("sha256:"):
        return ApiKey(name=name, sha256=rest.removeprefix("sha256:"))
    return ApiKey(name=name, key=SecretStr(rest))


def load_keys(settings: IngressSettings) -> list[ApiKey]:
    """Every configured key, from the config, its key file and its environment variable together."""
    keys: list[ApiKey] = []
    for i, entry in enumerate(settings.api_keys):
        key = parse_key_line(entry, f"key-{i}") if isinstance(entry, str) else entry
        if key is not None:
            keys.append(key)
    if settings.api_keys_file:
        lines = resolve_path(settings.api_keys_file).read_text(encoding="utf-8").splitlines()
        keys += [k for i, line in enumerate(lines) if (k := parse_key_line(line, f"file-{i}"))]
    if settings.api_keys_env:
        values = os.environ.get(settings.api_keys_env, "").split(",")
        keys += [k for i, v in enumerate(values) if (k := parse_key_line(v, f"env-{i}"))]
    return keys


def key_digest(key: ApiKey) -> bytes:
    if key.sha256:
        return bytes.fromhex(key.sha256.removeprefix("sha256:"))
    if key.key is None:
        raise ValueError(f"API key {key.name!r} has neither key nor sha256")
    return _digest(key.key.get_secret_value())


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a key's name, or the client address when the service is open."""

    name: str
    authenticated: bool
    limits: RateLimitSettings = RateLimitSettings()


class Authenticator:
    def __init__(self, keys: list[ApiKey], limits: RateLimitSettings) -> None:
        self._keys = [(k.name, key_digest(k)) for k in keys]
        self._defaults = limits
        self._limits = {
            k.name: RateLimitSettings(
                requests_per_minute=k.requests_per_minute or limits.requests_per_minute,
                tokens_per_minute=k.tokens_per_minute or limits.tokens_per_minute,
            )
            for k in keys
        }

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None, client_address: str) -> Principal:
        if self.open:
            return Principal(name=f"ip:{client_address}", authenticated=False, limits=self._defaults)
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthenticationError(
                "You didn't provide an API key. Provide it in the Authorization header as 'Bearer YOUR_KEY'."
            )
        digest = _digest(presented.strip())
        match: str | None = None
        for name, expected in self._keys:  # no early exit: every key costs the same time
            if hmac.compare_digest(digest, expected) and match is None:
                match = name
        if match is None:
            raise AuthenticationError("Incorrect API key provided.")
        return Principal(name=f"key:{match}", authenticated=True, limits=self._limits[match])
