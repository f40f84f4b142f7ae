"""Health and readiness: the model stage's own check and the ingress's 503 while it loads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from demo.model import make_demo_model
from deployments.ingress import Ingress
from deployments.metrics import VLMMetrics
from deployments.vlm import VLMServer
from engine.generate.engine import GenerateEngine
from engine.loader import load_model
from engine.protocol import Engine
from serve_app.errors import ServiceUnavailableError
from serve_app.settings import ModelSettings
from tests.engine.test_engine import user_request


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerateEngine]:
    path = make_demo_model(tmp_path_factory.mktemp("health") / "demo")
    made = GenerateEngine(load_model(ModelSettings(id="demo", path=str(path))))
    yield made
    made.close()


def replica(engine: Engine, stall_timeout_s: float = 2.0) -> VLMServer:
    """A VLMServer around a loaded engine, without Ray: check_health only needs these parts."""
    cls = VLMServer.func_or_class
    server = cls.__new__(cls)
    server._engine = engine
    server._executor = ThreadPoolExecutor(max_workers=1)
    server._stall_timeout_s = stall_timeout_s
    server._metrics = VLMMetrics()  # check_health brings the cache metrics up to date
    return server


def test_an_idle_model_that_runs_a_step_is_healthy(engine: Engine) -> None:
    asyncio.run(replica(engine).check_health())


def test_a_model_that_cannot_run_a_step_fails_the_check(engine: GenerateEngine,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    broken = torch_error()
    monkeypatch.setattr(engine.loaded.model.model.language_model, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        asyncio.run(replica(engine).check_health())


def test_a_batch_that_stopped_stepping_fails_the_check(engine: GenerateEngine) -> None:
    """A running batch whose steps stop (here: its consumer blocks the engine's thread) fails the check
    once the stall timeout has passed, and passes it while it steps."""
    request = engine.prepare(user_request(engine, "Go on.", None, max_tokens=400, ignore_eos=True))
    steps, release = [], threading.Event()

    def on_step(entries) -> None:
        steps.append(entries)
        if len(steps) >= 3:
            release.wait(30)

    done = engine.submit([request], on_step)
    try:
        deadline = time.monotonic() + 30
        while not steps and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.busy
        asyncio.run(replica(engine, stall_timeout_s=1).check_health())  # busy and stepping: healthy
        time.sleep(1.5)
        with pytest.raises(RuntimeError, match="no step"):
            asyncio.run(replica(engine, stall_timeout_s=1).check_health())
    finally:
        engine.cancel(request)
        release.set()
        done.result(timeout=30)
    asyncio.run(replica(engine, stall_timeout_s=1).check_health())  # idle again: a probe runs


def torch_error():
    def forward(*args, **kwargs):
        raise RuntimeError("CUDA error: device lost (simulated)")

    return forward


class _LoadingHandle:
    """Stands in for the VLMServer handle while its replica is still loading: calls never return."""

    class _Method:
        def remote(self):
            return asyncio.get_running_loop().create_future()

    model_info = _Method()


def test_ingress_answers_503_while_the_model_loads() -> None:
    # Only the two attributes the method reads; a real Ingress needs a running Serve replica.
    ingress = SimpleNamespace(_vlm=_LoadingHandle(), _model_info=None)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as info:
        asyncio.run(Ingress.func_or_class._ensure_model_ready(ingress))
    assert time.monotonic() - started < 10
    assert info.value.status_code == 503 and "Retry-After" in info.value.headers()
