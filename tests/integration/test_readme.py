"""The README's examples run as written against a real server (only the host and image differ)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.images import ImageServer, png_bytes

pytestmark = pytest.mark.integration
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def block(language: str, containing: str) -> str:
    for code in re.findall(rf"```{language}\n(.*?)```", README, re.S):
        if containing in code:
            return code
    raise AssertionError(f"no {language} block with {containing!r} in README.md")


def on_server(code: str, base_url: str) -> str:
    return code.replace("http://127.0.0.1:8000", base_url)


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


def test_python_sdk_example(server, image_server: ImageServer, capsys: pytest.CaptureFixture) -> None:
    image_server.files["/circle.png"] = (png_bytes((96, 96)), "image/png")
    code = on_server(block("python", "from openai import OpenAI"), server.base_url)
    code = re.sub(r"https://upload\.wikimedia\.org/\S+?\.png", image_server.url("/circle.png"), code)
    exec(compile(code, "README.md", "exec"), {})
    assert "completion_tokens=" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_fetch_example_in_node(server, tmp_path: Path) -> None:
    script = tmp_path / "example.mjs"
    script.write_text(on_server(block("javascript", "fetch("), server.base_url))
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "prompt_tokens" in out


def test_protection_example_is_a_valid_config() -> None:
    import yaml

    from serve_app.settings import ImageSettings, IngressSettings

    example = yaml.safe_load(block("yaml", "api_keys_file"))
    ingress = IngressSettings.model_validate(example["ingress"])
    assert ingress.rate_limited and ingress.rate_limits.requests_per_minute == 60
    ImageSettings.model_validate(example["images"])
