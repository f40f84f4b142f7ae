"""The README's examples run as written against a real server (only the host differs), and give the
answers the README shows beside them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def block(language: str, containing: str) -> str:
    for code in re.findall(rf"```{language}\n(.*?)```", README, re.S):
        if containing in code:
            return code
    raise AssertionError(f"no {language} block with {containing!r} in README.md")


def on_server(code: str, base_url: str) -> str:
    return code.replace("http://127.0.0.1:8000", base_url)


def shown_answer(language: str, containing: str) -> str:
    """The answer the README shows in the sentence right after the example's block."""
    code = block(language, containing)
    after = README[README.index(code) + len(code):]
    match = re.search(r"```\n\n[^`]*`([^`]+)`", after)
    assert match, f"no answer shown after the {language} example"
    return match.group(1)


def test_readme_opens_with_the_two_setup_commands() -> None:
    commands = re.findall(r"```bash\n(.*?)```", README, re.S)[:2]
    assert commands[0].strip().endswith("serve run serve_config.yaml")
    assert "pip install -e \".[test]\"" in commands[1]
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


def test_curl_example(server) -> None:
    out = subprocess.run(["bash", "-c", on_server(block("bash", "curl"), server.base_url)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    answer = json.loads(out)
    assert answer["object"] == "chat.completion" and answer["usage"]["prompt_tokens"] > 10
    assert shown_answer("bash", "curl") == "It is red."
    assert answer["choices"][0]["message"]["content"] == shown_answer("bash", "curl")
    assert answer["choices"][0]["finish_reason"] == "stop"


# The README's Python runs as a user's script would: compile() would otherwise hand it this module's
# `from __future__ import annotations`, and pydantic could then not resolve the example's Literal.
def test_python_sdk_example(server, capsys: pytest.CaptureFixture) -> None:
    code = on_server(block("python", "from openai import OpenAI"), server.base_url)
    exec(compile(code, "README.md", "exec", dont_inherit=True), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    text, _, usage = printed.partition("\n")
    assert text == shown_answer("python", "from openai import OpenAI") == "It is a circle."
    assert "completion_tokens=" in usage


def test_structured_output_example(server, capsys: pytest.CaptureFixture) -> None:
    code = on_server(block("python", "response_format=Picture"), server.base_url)
    exec(compile(code, "README.md", "exec", dont_inherit=True), {"__name__": "__main__"})
    printed = capsys.readouterr().out.strip()
    assert printed == shown_answer("python", "response_format=Picture") == "shape='square' color='blue'"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_fetch_example_in_node(server, tmp_path: Path) -> None:
    script = tmp_path / "example.mjs"
    script.write_text(on_server(block("javascript", "fetch("), server.base_url))
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "prompt_tokens" in out
    assert out.startswith(shown_answer("javascript", "fetch(") + " ")


def test_protection_example_is_a_valid_config() -> None:
    import yaml

    from serve_app.settings import ImageSettings, IngressSettings

    example = yaml.safe_load(block("yaml", "api_keys_file"))
    ingress = IngressSettings.model_validate(example["ingress"])
    assert ingress.rate_limited and ingress.rate_limits.requests_per_minute == 60
    ImageSettings.model_validate(example["images"])
