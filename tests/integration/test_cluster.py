"""Cluster operations on a real two-node Ray cluster started with `ray start`, as an operator would.

The head node stands for a CPU machine and a second node for a GPU machine: it carries an
`accelerator` resource, which the model stage asks for, so placement can be checked on CPUs.
The application goes on with `serve deploy`; the tests read the Ray dashboard's REST API and Ray's
Prometheus endpoint, and drive autoscaling with a bounded load.

Ray's token authentication is on, set up exactly as the README's cluster section says: a token made
once with `ray get-auth-token --generate` into `~/.ray/auth_token` (HOME is a fresh directory here,
as on a new machine), `RAY_AUTH_MODE=token` for `ray start` and the serve CLI, and the token as a
Bearer token for the dashboard's REST API.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.images import MODEL, data_url, png_bytes
from tests.support.serving import ROOT, free_port

pytestmark = pytest.mark.integration
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
SERVE = [sys.executable, "-m", "ray.serve.scripts"]
NODE_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "token"}  # the README's `export RAY_AUTH_MODE=token`


@dataclass
class Cluster:
    gcs: str
    dashboard: str
    metrics_ports: list[int]
    http_port: int
    processes: list[subprocess.Popen]
    workdir: Path
    ray_dir: Path
    home: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def serve(self, *args: str, timeout: float = 120, auth: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, **NODE_ENV, "HOME": str(self.home)}
        if not auth:
            env.pop("RAY_AUTH_MODE", None)
        return subprocess.run([*SERVE, *args, "--address", self.dashboard], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=env)

    def get(self, path: str, **params) -> dict:
        response = httpx.get(f"{self.dashboard}{path}", params=params, timeout=10,
                             headers={"Authorization": f"Bearer {self.token}"})
        response.raise_for_status()
        return response.json()

    def applications(self) -> dict:
        return self.get("/api/serve/applications/").get("applications", {})

    def deployment(self, name: str) -> dict:
        return self.applications().get("vlm", {}).get("deployments", {}).get(name, {})

    def replicas(self, deployment: str, states: tuple[str, ...] = ("RUNNING",)) -> int:
        return sum(1 for r in self.deployment(deployment).get("replicas", []) if r.get("state") in states)


def start_node(args: list[str], log: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, **NODE_ENV, "HOME": str(home)}
    return subprocess.Popen([*RAY, "start", "--block", *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def wait_until(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - the service is still coming up
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    home = workdir / "home"  # a new operator's home: no token yet
    home.mkdir()
    made = subprocess.run([*RAY, "get-auth-token", "--generate"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(home)})
    assert made.returncode == 0, made.stderr
    gcs_port, dash_port, head_metrics, worker_metrics = (free_port() for _ in range(4))
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes.
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    common = ["--disable-usage-stats", "--num-gpus=0"]
    head = start_node(
        [f"--port={gcs_port}", "--head", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--metrics-export-port={head_metrics}",
         "--num-cpus=4", '--resources={"cpu_node": 100}', f"--temp-dir={ray_dir}", *common],
        workdir / "head.log", home,
    )
    processes = [head]
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        token_file = home / ".ray" / "auth_token"
        bearer = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        wait_until(lambda: httpx.get(f"{dashboard}/api/version", headers=bearer, timeout=5).status_code == 200, 180,
                   "the head node")
        worker = start_node(
            [f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1", f"--metrics-export-port={worker_metrics}",
             "--num-cpus=4", '--resources={"accelerator": 2}', *common],
            workdir / "worker.log", home,
        )
        processes.append(worker)
        nodes = lambda: httpx.get(f"{dashboard}/nodes?view=summary", headers=bearer,  # noqa: E731
                                  timeout=5).json()["data"]["summary"]
        wait_until(lambda: sum(n["raylet"]["state"] == "ALIVE" for n in nodes()) == 2, 120, "the second node")
        yield Cluster(f"127.0.0.1:{gcs_port}", dashboard, [head_metrics, worker_metrics], free_port(), processes, workdir,
                      ray_dir, home)
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(ray_dir, ignore_errors=True)


def cluster_config(cluster: Cluster) -> dict:
    """serve_config.yaml, with the model stage pinned to the accelerator node and quick autoscaling."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = cluster.http_port
    app = config["applications"][0]
    app["args"]["images"]["allowed_hosts"] = ["127.0.0.1"]
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
               "upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 2, "metrics_interval_s": 1}
    for deployment in app["deployments"]:
        if deployment["name"] == "VLMServer":
            deployment.pop("num_replicas", None)
            deployment["ray_actor_options"] = {"num_cpus": 1, "resources": {"accelerator": 1}}
            deployment["autoscaling_config"] = copy.deepcopy(scaling)
            deployment["user_config"]["max_batch_size"] = 4
        if deployment["name"] == "ImagePreprocessor":
            deployment["ray_actor_options"] = {"num_cpus": 0.5, "resources": {"cpu_node": 1}}
            # Each image takes tens of milliseconds here, so a low target is what a busy stage shows.
            deployment["autoscaling_config"] = {**scaling, "target_ongoing_requests": 0.25}
    return config


@pytest.fixture(scope="module")
def deployed(cluster: Cluster) -> Cluster:
    path = cluster.workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cluster_config(cluster)))
    result = cluster.serve("deploy", str(path))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: cluster.applications().get("vlm", {}).get("status") == "RUNNING", 300, "the app to run")
    return cluster


def noise_jpeg(size: tuple[int, int], seed: int, mark: int = 0) -> str:
    """Random pixels: an image that costs real decoding and resizing work, unlike a flat color. `mark`
    is drawn along its top edge, so each mark is another picture to the caches keyed by content, for
    the price of the same noise."""
    import io

    from PIL import Image

    image = Image.frombytes("RGB", size, random_bytes(seed, size[0] * size[1] * 3))
    for bit in range(24):  # the mark's bits as black or white 16-pixel squares, clear through JPEG's rounding
        image.paste((255, 255, 255) if mark >> bit & 1 else (0, 0, 0), (16 * bit, 0, 16 * bit + 16, 16))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return data_url(buffer.getvalue(), "image/jpeg")


@functools.cache
def random_bytes(seed: int, count: int) -> bytes:
    import random

    return random.Random(seed).randbytes(count)


def chat(base_url: str, images: list[str] | None = None, **extra) -> httpx.Response:
    urls = images or [data_url(png_bytes((120, 80)))]
    content = [{"type": "text", "text": "What is it?"},
               *({"type": "image_url", "image_url": {"url": url}} for url in urls)]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


def test_dashboard_shows_the_application_running_with_three_deployments(deployed: Cluster) -> None:
    app = deployed.applications()["vlm"]
    assert app["status"] == "RUNNING"
    assert {"Ingress", "ImagePreprocessor", "VLMServer"} <= set(app["deployments"])
    assert chat(deployed.base_url).status_code == 200
    health = httpx.get(f"{deployed.base_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_the_cluster_refuses_callers_without_the_token(deployed: Cluster) -> None:
    """Authentication is really on: the dashboard's API and the serve CLI both need the token."""
    assert httpx.get(f"{deployed.dashboard}/api/serve/applications/", timeout=10).status_code in (401, 403)
    wrong = {"Authorization": "Bearer not-the-token"}
    assert httpx.get(f"{deployed.dashboard}/api/serve/applications/", headers=wrong, timeout=10).status_code in (401, 403)
    refused = deployed.serve("status", auth=False)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()
    status = deployed.serve("status")
    assert status.returncode == 0, status.stderr
    assert "vlm" in status.stdout and "RUNNING" in status.stdout


def test_model_stage_runs_on_the_accelerator_node(deployed: Cluster) -> None:
    nodes = deployed.get("/api/v0/nodes", detail=1, limit=100)["data"]["result"]["result"]
    accelerator_nodes = {n["node_id"] for n in nodes if "accelerator" in (n.get("resources_total") or {})}
    cpu_nodes = {n["node_id"] for n in nodes if "cpu_node" in (n.get("resources_total") or {})}
    assert len(accelerator_nodes) == 1 and len(cpu_nodes) == 1

    def placed(name: str) -> set[str]:
        actors = deployed.get("/api/v0/actors", limit=1000, detail=1,
                              filter_keys=["class_name", "state"], filter_predicates=["=", "="],
                              filter_values=[f"ServeReplica:vlm:{name}", "ALIVE"])["data"]["result"]["result"]
        return {a["node_id"] for a in actors}

    assert placed("VLMServer") <= accelerator_nodes and placed("VLMServer")
    assert placed("ImagePreprocessor") <= cpu_nodes and placed("ImagePreprocessor")


def test_metrics_reach_prometheus(deployed: Cluster) -> None:
    for _ in range(3):
        assert chat(deployed.base_url).status_code == 200
    stream_body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{deployed.base_url}/v1/chat/completions", json=stream_body, timeout=60) as r:
        list(r.iter_lines())
    wanted = ["ray_vlm_requests", "ray_vlm_prompt_tokens", "ray_vlm_completion_tokens",
              "ray_vlm_time_to_first_token_s_count", "ray_vlm_inter_token_latency_s_count", "ray_vlm_batch_size_count",
              "ray_vlm_queue_depth", "ray_vlm_image_fetch_bytes_count", "ray_vlm_image_fetch_latency_s_count"]

    def scraped() -> dict[str, float]:
        text = "\n".join(httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text for p in deployed.metrics_ports)
        values: dict[str, float] = {}
        for name in wanted:
            for match in re.finditer(rf"^{name}(?:_total)?(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
                values[name] = max(values.get(name, 0.0), float(match.group(1)))
        return values

    values = wait_until(lambda: (v := scraped()) and all(v.get(n, 0) > 0 for n in wanted if n != "ray_vlm_queue_depth")
                        and "ray_vlm_queue_depth" in v and v, 90, "the custom metrics", interval=3)
    assert values["ray_vlm_completion_tokens"] >= values["ray_vlm_requests"] > 0


def test_replicas_scale_up_under_load_and_back_down(deployed: Cluster) -> None:
    stop = threading.Event()
    marks = itertools.count()  # new pictures every request: the prefix and encoder caches must not absorb the load

    def load() -> int:
        done = 0
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            mark = next(marks)
            pictures = [noise_jpeg((900, 700), seed, mark) for seed in range(3)]
            chat(deployed.base_url, images=pictures, max_tokens=24, ignore_eos=True)
            done += 1
        return done

    # Scaling up is the autoscaler raising a stage's target and Serve starting a second replica for it.
    # Whether that replica finishes starting before the load ends is the machine's speed, not the
    # autoscaler's: on two busy cores a new model replica takes over a minute to import and load.
    peak = {name: {"target": 0, "replicas": 0} for name in ("VLMServer", "ImagePreprocessor")}
    starting_or_running = ("STARTING", "UPDATING", "RUNNING")

    def scaled_up() -> bool:
        for name, seen in peak.items():
            seen["target"] = max(seen["target"], deployed.deployment(name).get("target_num_replicas", 0))
            seen["replicas"] = max(seen["replicas"], deployed.replicas(name, starting_or_running))
        return all(seen["target"] >= 2 and seen["replicas"] >= 2 for seen in peak.values())

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(load) for _ in range(12)]
        try:
            try:
                wait_until(scaled_up, 80, "both stages to scale up", interval=2)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; peak seen: {peak}") from None
        finally:
            stop.set()
        answered = [f.result() for f in futures]
        assert sum(answered) > 0, answered

    def scaled_down() -> bool:
        return all(deployed.deployment(name).get("target_num_replicas") == 1
                   and deployed.replicas(name, starting_or_running) == 1 for name in peak)

    wait_until(scaled_down, 180, "both stages to scale back down", interval=2)


def test_batching_knobs_change_live_through_user_config(deployed: Cluster) -> None:
    config = cluster_config(deployed)
    vlm = next(d for d in config["applications"][0]["deployments"] if d["name"] == "VLMServer")
    vlm["user_config"]["max_batch_size"] = 3
    path = deployed.workdir / "serve_config_b3.yaml"
    path.write_text(yaml.safe_dump(config))
    before = {a for a in _replica_pids(deployed)}
    assert deployed.serve("deploy", str(path)).returncode == 0
    wait_until(lambda: deployed.applications()["vlm"]["status"] == "RUNNING"
               and deployed.applications()["vlm"]["deployments"]["VLMServer"]["status"] == "HEALTHY", 120,
               "the reconfigured app")
    assert before & _replica_pids(deployed), "a user_config change must not restart the replicas"
    logs = "".join(p.read_text(errors="replace") for p in deployed.ray_dir.rglob("replica_vlm_VLMServer_*.log"))
    assert "max_batch_size=3" in logs


def _replica_pids(cluster: Cluster) -> set[int]:
    info = cluster.applications()["vlm"]["deployments"]["VLMServer"]
    return {r["pid"] for r in info.get("replicas", []) if r.get("state") == "RUNNING"}


@pytest.mark.parametrize("name", ["glm-4.6v-flash-bf16.yaml", "glm-4.6v-flash-gptq4.yaml"])
def test_gpu_cluster_configs_deploy(deployed: Cluster, name: str) -> None:
    """`serve deploy` accepts each GPU config and builds its graph; replicas would need GPUs and weights."""
    config = yaml.safe_load((ROOT / "configs" / "serve" / name).read_text())
    config["http_options"]["port"] = deployed.http_port
    path = deployed.workdir / name
    path.write_text(yaml.safe_dump(config))
    result = deployed.serve("deploy", str(path))
    assert result.returncode == 0, result.stderr
    app = wait_until(lambda: (a := deployed.applications().get("vlm")) and a.get("deployments")
                     and {"Ingress", "ImagePreprocessor", "VLMServer", "RateLimiter"} <= set(a["deployments"]) and a,
                     120, f"{name} to be built")
    vlm = app["deployments"]["VLMServer"]
    assert vlm["deployment_config"]["ray_actor_options"]["num_gpus"] == 1


def test_grafana_dashboard_queries_the_metrics_the_app_exports() -> None:
    dashboard = json.loads((ROOT / "configs" / "grafana" / "vlm-serve-dashboard.json").read_text())
    expressions = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    source = (ROOT / "deployments" / "metrics.py").read_text()
    exported = set(re.findall(r'"(vlm_[a-z_]+)"', source))
    assert exported and all(f"ray_{name}" in expressions for name in exported), exported
