"""API keys from every source, constant-time matching, and the rate limiter's sliding windows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from deployments.ratelimit import RateLimiter
from serve_app.errors import AuthenticationError
from serve_app.openai.auth import Authenticator, load_keys, parse_key_line
from serve_app.settings import IngressSettings, RateLimitSettings


def test_keys_come_from_config_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# team keys\nalice:sk-alice\n\nbob:sha256:{hashlib.sha256(b'sk-bob').hexdigest()}\n")
    monkeypatch.setenv("VLM_KEYS", "sk-env-1,ci:sk-env-2")
    settings = IngressSettings(api_keys=["sk-inline", {"name": "ops", "key": "sk-ops"}],
                               api_keys_file=str(key_file), api_keys_env="VLM_KEYS")
    auth = Authenticator(load_keys(settings), RateLimitSettings())
    assert auth.key_count == 6
    for key, name in [("sk-inline", "key:key-0"), ("sk-ops", "key:ops"), ("sk-alice", "key:alice"),
                      ("sk-bob", "key:bob"), ("sk-env-1", "key:env-0"), ("sk-env-2", "key:ci")]:
        assert auth.authenticate(f"Bearer {key}", "1.2.3.4").name == name
    for header in (None, "", "Bearer ", "Basic sk-ops", "Bearer sk-nope", "sk-ops"):
        with pytest.raises(AuthenticationError):
            auth.authenticate(header, "1.2.3.4")


def test_open_service_names_the_client_address() -> None:
    auth = Authenticator([], RateLimitSettings(requests_per_minute=5))
    principal = auth.authenticate(None, "10.0.0.9")
    assert auth.open and principal.name == "ip:10.0.0.9" and principal.limits.requests_per_minute == 5


def test_key_lines() -> None:
    assert parse_key_line("  # comment", "x") is None
    assert parse_key_line("sk-plain", "x").name == "x"
    assert parse_key_line("sha256:ab", "x").sha256 == "ab"
    assert parse_key_line("svc:sha256:ab", "x").name == "svc"


def test_secret_keys_do_not_show_in_settings_repr() -> None:
    settings = IngressSettings(api_keys=[{"name": "ops", "key": "sk-very-secret"}])
    assert "sk-very-secret" not in repr(settings) and "sk-very-secret" not in str(settings.model_dump())


def limiter() -> RateLimiter:
    return RateLimiter.func_or_class()


def test_requests_per_minute_is_a_sliding_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("deployments.ratelimit.time.monotonic", lambda: clock[0])
    rl, limits = limiter(), RateLimitSettings(requests_per_minute=3)
    assert [rl.admit("a", 1, limits).admitted for _ in range(4)] == [True, True, True, False]
    refused = rl.admit("a", 1, limits)
    assert refused.retry_after_s == pytest.approx(60.0) and refused.requests.remaining == 0
    assert rl.admit("b", 1, limits).admitted  # budgets are per client
    clock[0] += 60.01
    assert rl.admit("a", 1, limits).admitted


def test_tokens_are_reserved_then_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("deployments.ratelimit.time.monotonic", lambda: clock[0])
    rl, limits = limiter(), RateLimitSettings(tokens_per_minute=1000)
    first = rl.admit("a", 800, limits)
    assert first.admitted and first.tokens.remaining == 200
    assert not rl.admit("a", 300, limits).admitted
    rl.settle("a", first.reservation, 100)  # it really used 100
    second = rl.admit("a", 300, limits)
    assert second.admitted and second.tokens.remaining == 600
