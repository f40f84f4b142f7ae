"""API keys: every source validated in the settings model, fail-closed sources, constant-time matching
(the rate limits: test_rate_windows.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.errors import AuthenticationError
from serve_app.openai.auth import Authenticator
from serve_app.settings import AppArgs, IngressSettings, KeySourceError, RateLimitSettings


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_keys_come_from_config_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# team keys\nsk-file-1\n\nsha256:{sha256('sk-file-2')}\n")
    monkeypatch.setenv("VLM_KEYS", "sk-env-1, sk-env-2")
    settings = IngressSettings(api_keys=["sk-inline", {"name": "ops", "key": "sk-ops"}],
                               api_keys_file=str(key_file), api_keys_env="VLM_KEYS")
    auth = Authenticator.from_settings(settings)
    assert auth.key_count == 6
    for key, name in [("sk-inline", "key:api_keys[0]"), ("sk-ops", "key:ops"), ("sk-file-1", "key:api_keys_file:2"),
                      ("sk-file-2", "key:api_keys_file:4"), ("sk-env-1", "key:api_keys_env[0]"),
                      ("sk-env-2", "key:api_keys_env[1]")]:
        assert auth.authenticate(f"Bearer {key}", "1.2.3.4").name == name
    for header in (None, "", "Bearer ", "Basic sk-ops", "Bearer sk-nope", "sk-ops"):
        with pytest.raises(AuthenticationError):
            auth.authenticate(header, "1.2.3.4")


def test_no_key_source_at_all_is_an_open_service() -> None:
    auth = Authenticator.from_settings(IngressSettings(rate_limits={"requests_per_minute": 5}))
    principal = auth.authenticate(None, "10.0.0.9")
    assert auth.open and principal.name == "ip:10.0.0.9" and principal.limits.requests_per_minute == 5


@pytest.mark.parametrize("environment", [None, "", " , ,"], ids=["unset", "empty", "only separators"])
def test_an_environment_variable_without_keys_refuses_to_start(
    environment: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLM_KEYS", raising=False)
    if environment is not None:
        monkeypatch.setenv("VLM_KEYS", environment)
    with pytest.raises(KeySourceError, match="VLM_KEYS.*allow_unauthenticated"):
        IngressSettings(api_keys_env="VLM_KEYS").configured_keys()
    # Other keys do not excuse an empty source: it is a configuration mistake either way.
    with pytest.raises(KeySourceError, match="VLM_KEYS"):
        IngressSettings(api_keys=["sk-inline"], api_keys_env="VLM_KEYS").configured_keys()
    assert IngressSettings(api_keys_env="VLM_KEYS", allow_unauthenticated=True).configured_keys() == []


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_an_empty_key_file_refuses_to_start(content: str, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(content)
    with pytest.raises(KeySourceError, match="api_keys_file.*has no key"):
        IngressSettings(api_keys_file=str(key_file)).configured_keys()
    assert IngressSettings(api_keys_file=str(key_file), allow_unauthenticated=True).configured_keys() == []


def test_a_missing_key_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(KeySourceError, match="cannot be read"):
        IngressSettings(api_keys_file=str(tmp_path / "absent.txt"), allow_unauthenticated=True).configured_keys()


def test_unnamed_keys_each_get_their_own_name_and_limits() -> None:
    settings = IngressSettings(api_keys=[{"key": "sk-a", "requests_per_minute": 5},
                                         {"key": "sk-b", "requests_per_minute": 7}])
    auth = Authenticator.from_settings(settings)
    a, b = auth.authenticate("Bearer sk-a", "x"), auth.authenticate("Bearer sk-b", "x")
    assert (a.name, a.limits.requests_per_minute) == ("key:api_keys[0]", 5)
    assert (b.name, b.limits.requests_per_minute) == ("key:api_keys[1]", 7)


def refusal(entries: list) -> str:
    with pytest.raises(ValidationError) as info:
        IngressSettings(api_keys=entries)
    return str(info.value)


def test_a_string_key_is_never_split_into_a_name_and_a_key() -> None:
    message = refusal(["sk-fine", "team:sk-secret-part"])
    assert "api_keys.1" in message and "may not contain ':'" in message
    assert "sk-secret-part" not in message  # Ray logs the refused args: the key must not show
    # With the mapping form the whole value is the key, colon and all.
    auth = Authenticator.from_settings(IngressSettings(api_keys=[{"name": "team", "key": "team:sk-secret-part"}]))
    assert auth.authenticate("Bearer team:sk-secret-part", "x").name == "key:team"
    with pytest.raises(AuthenticationError):
        auth.authenticate("Bearer sk-secret-part", "x")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"name": "a", "sha256": "not-hex" * 9 + "x"}, "64 hex digits"),
        ({"name": "a", "sha256": sha256("sk")[:40]}, "64 hex digits"),  # truncated: would never match
        ("sha256:" + sha256("sk")[:-1], "64 hex digits"),
        ({"name": "a"}, "exactly one of"),
        ({"name": "a", "key": "sk", "sha256": sha256("sk")}, "exactly one of"),
        ({"key": "sk with space"}, "printable ASCII"),
        ("", "printable ASCII"),
        ({"name": "has space", "key": "sk"}, "pattern"),
        ({"name": "api_keys[0]", "key": "sk"}, "pattern"),  # cannot take an unnamed key's name
    ],
)
def test_every_key_is_validated_and_its_position_named(entry: object, reason: str) -> None:
    message = refusal([{"name": "first", "key": "sk-first"}, entry])
    assert "api_keys.1" in message and reason in message, message


def test_key_names_are_unique_and_a_key_is_given_once(tmp_path: Path) -> None:
    message = refusal([{"name": "ops", "key": "sk-1"}, {"name": "ops", "key": "sk-2"}])
    assert "api_keys[1] has the name 'ops' of api_keys[0]" in message
    key_file = tmp_path / "keys.txt"
    key_file.write_text("sk-same\n")
    with pytest.raises(KeySourceError, match=r"'api_keys_file:1' is the same key as 'ops'"):
        IngressSettings(api_keys=[{"name": "ops", "sha256": sha256("sk-same")}], api_keys_file=str(key_file)).configured_keys()


def test_a_bad_line_in_a_key_file_is_named_by_its_line(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("sk-good\nalice:sk-alice\n")
    with pytest.raises(KeySourceError, match=r"api_keys_file:2: .*may not contain ':'") as info:
        IngressSettings(api_keys_file=str(key_file)).configured_keys()
    assert "sk-alice" not in str(info.value)


def test_digests_are_normalised() -> None:
    digest = sha256("sk-upper")
    settings = IngressSettings(api_keys=[{"name": "u", "sha256": "sha256:" + digest.upper()}])
    assert Authenticator.from_settings(settings).authenticate("Bearer sk-upper", "x").name == "key:u"


def test_secret_keys_do_not_show_in_settings_repr_or_errors() -> None:
    settings = IngressSettings(api_keys=[{"name": "ops", "key": "sk-very-secret"}])
    assert "sk-very-secret" not in repr(settings) and "sk-very-secret" not in str(settings.model_dump())
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate({"ingress": {"api_keys": [{"name": "bad name", "key": "sk-very-secret"},
                                                         "sk-very secret", "x:sk-very-secret"]}})
    assert "sk-very" not in str(info.value)


def test_cors_refuses_credentials_for_every_origin() -> None:
    with pytest.raises(ValidationError, match="allow_credentials"):
        IngressSettings(cors={"allow_credentials": True})
    IngressSettings(cors={"allow_credentials": True, "allow_origins": ["https://app.example.com"]})


def test_per_key_budgets_override_the_defaults() -> None:
    settings = IngressSettings(api_keys=[{"name": "big", "key": "sk-big", "tokens_per_minute": 9000}],
                               rate_limits=RateLimitSettings(requests_per_minute=10, tokens_per_minute=100))
    limits = Authenticator.from_settings(settings).authenticate("Bearer sk-big", "x").limits
    assert (limits.requests_per_minute, limits.tokens_per_minute) == (10, 9000)
