"""API keys: how a presented key is checked, and who it names.

The keys come from the settings (`IngressSettings.configured_keys`, which validates every source).
Only SHA-256 digests are kept in memory, and a presented key is compared against every digest in
constant time, so neither timing nor logs reveal a key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from serve_app.errors import AuthenticationError
from serve_app.settings import ApiKey, IngressSettings, RateLimitSettings


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_digest(key: ApiKey) -> bytes:
    if key.sha256 is not None:
        return bytes.fromhex(key.sha256)
    assert key.key is not None  # the settings model requires exactly one of the two
    return _digest(key.key.get_secret_value())


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a key's name, or the client address when the service is open."""

    name: str
    authenticated: bool
    limits: RateLimitSettings = field(default_factory=RateLimitSettings)


class Authenticator:
    def __init__(self, keys: list[ApiKey], limits: RateLimitSettings) -> None:
        if any(k.name is None for k in keys):
            raise ValueError("every key needs its name (IngressSettings.configured_keys names them)")
        self._keys = [(str(k.name), key_digest(k)) for k in keys]
        self._defaults = limits
        self._limits = {
            str(k.name): RateLimitSettings(
                requests_per_minute=k.requests_per_minute or limits.requests_per_minute,
                tokens_per_minute=k.tokens_per_minute or limits.tokens_per_minute,
            )
            for k in keys
        }

    @classmethod
    def from_settings(cls, settings: IngressSettings) -> Authenticator:
        """Raises KeySourceError when a configured key source yields no usable key (fail closed)."""
        return cls(settings.configured_keys(), settings.rate_limits)

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None, client_address: str) -> Principal:
        if self.open:
            return Principal(name=f"ip:{client_address}", authenticated=False, limits=self._defaults)
        scheme, _, presented = (authorization or "").strip().partition(" ")
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
