"""Start the application the way a user does — `serve run CONFIG` — on a free loopback port.

Each server gets its own local Ray instance (RAY_ADDRESS=local), so tests never attach to a
cluster that happens to run on the machine, and stopping the process stops everything it started.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for_tests(port: int, overrides: dict[str, Any] | None = None, deployments: dict[str, dict] | None = None) -> dict:
    """serve_config.yaml with the port changed, loopback images allowed and `overrides` merged into args."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    args = copy.deepcopy(app.get("args", {}))
    args.setdefault("images", {})["allowed_hosts"] = ["127.0.0.1"]
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key] = {**args[key], **value}
        else:
            args[key] = value
    app["args"] = args
    for deployment in app.get("deployments", []):
        deployment.update((deployments or {}).get(deployment["name"], {}))
    return config


@dataclass
class ServeProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process.poll() is not None:
            return
        # Ctrl-C is how a user stops `serve run`: it tears the app and its Ray instance down.
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def session_processes(server: ServeProcess, matches: Callable[[list[bytes]], bool]) -> list[int]:
    """Live processes whose command line (argv as bytes) `matches`, among the processes of `server`'s
    session: `serve run` starts in its own session (start_new_session) and Ray's raylet, workers and
    their children stay in it, so other servers on the machine (other tests, other people) never match."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            if fields[0] in ("Z", "X") or int(fields[3]) != server.process.pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if matches(argv):
            pids.append(int(entry))
    return sorted(pids)


def launch(workdir: Path, config: dict, env: dict[str, str] | None = None) -> ServeProcess:
    """`serve run` of `config` (written to WORKDIR/serve_config.yaml), its output in WORKDIR/serve.log;
    not waited for."""
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "serve.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "ray.serve.scripts", "run", str(config_path)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # RAY_DEDUP_LOGS=0: tests read replica log lines, which Ray would otherwise fold together.
            env={**os.environ, "RAY_ADDRESS": "local", "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group, so stop() reaches every child
        )
    return ServeProcess(process, config["http_options"]["port"], log_path)


def start_server(
    workdir: Path,
    config: dict,
    ready_timeout: float = 240.0,
    env: dict[str, str] | None = None,
    ready_check_headers: dict[str, str] | None = None,
) -> ServeProcess:
    server = launch(workdir, config, env)
    process = server.process
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited with {process.returncode}:\n{server.log()[-5000:]}")
        try:
            ready = httpx.get(f"{server.base_url}/v1/models", headers=ready_check_headers, timeout=5)
            if ready.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"serve run was not ready within {ready_timeout}s:\n{server.log()[-5000:]}")
