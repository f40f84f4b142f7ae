"""The engine in a process of its own (engine/process/engine_process.py), driven as the model replica
drives it, on CPU with the demo checkpoint: the same text as the engine in-process, cancellation
across the pipe, probes, and a child that dies, cannot load, or loses its replica."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from openai import OpenAI

from demo.model import make_demo_model
from engine.generate.engine import GenerateEngine
from engine.loader import load_model
from engine.process.engine_process import EngineProcess
from serve_app.errors import ServiceUnavailableError
from serve_app.settings import ContinuousEngineSettings, ModelSettings
from tests.engine.test_continuous_engine import mixed_requests, wait_until
from tests.engine.test_engine import preprocessed, run, user_request
from tests.support.images import MODEL, data_url, png_bytes
from tests.support.serving import ROOT, ServeProcess, config_for_tests, free_port, session_processes, start_server


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> ModelSettings:
    path = make_demo_model(tmp_path_factory.mktemp("process") / "ckpt")
    return ModelSettings(id="demo", path=str(path), max_model_len=4096, engine="continuous",
                         continuous=ContinuousEngineSettings(max_slots=4), engine_process=True)


@pytest.fixture(scope="module")
def in_process(settings: ModelSettings) -> Iterator[GenerateEngine]:
    made = GenerateEngine(load_model(settings.model_copy(update={"engine": "generate"})))
    yield made
    made.close()


@pytest.fixture(scope="module")
def process(settings: ModelSettings) -> Iterator[EngineProcess]:
    started = EngineProcess(settings)
    yield started
    started.close()
    assert started._process.returncode == 0


def long_request(engine, text: str = "Go on forever."):
    """Seconds of decoding even on a fast CPU: it ends when the test cancels it."""
    return engine.prepare(user_request(engine, text, None, max_tokens=4000, ignore_eos=True))


def test_the_same_text_limits_and_stops_as_the_engine_in_process(process, in_process) -> None:
    requests = [
        *mixed_requests(in_process, max_tokens=30),
        user_request(in_process, "Hi", None, max_tokens=25, ignore_eos=True),
        user_request(in_process, "Describe.", preprocessed(in_process, (112, 112), (9, 9, 9)), max_tokens=40,
                     min_tokens=30),
        user_request(in_process, "Tell me.", None, temperature=1.0, top_p=0.9, seed=42, max_tokens=10),
        user_request(in_process, "Stop early.", None, max_tokens=40, ignore_eos=True, stop=("e",)),
    ]
    expected = run(in_process, requests)  # generate(): the engine the continuous one is tested against
    got = run(process, requests)
    assert got[:-2] + got[-1:] == expected[:-2] + expected[-1:]
    assert got[-2] == run(process, requests[-2:-1])[0]  # seeded: repeatable across batches
    assert process.device == "cpu" and process.quantization == in_process.quantization


def test_the_generate_engine_runs_behind_the_pipe_too(settings, in_process) -> None:
    """`engine: generate` (or `auto` falling back to it) in the child: batches one after another, and a
    request whose sampling fails there gets its own error across the pipe while its neighbours answer."""
    generate = EngineProcess(settings.model_copy(update={"engine": "generate"}))
    try:
        requests = mixed_requests(in_process, max_tokens=12)
        expected = run(in_process, requests)
        assert run(generate, requests) == expected
        bad_seed = user_request(in_process, "Hi", None, temperature=1.0, seed=2**64, max_tokens=5)
        good, failed = run(generate, [requests[0], bad_seed])
        assert good == expected[0]
        assert isinstance(failed, Exception) and "Overflow" in str(failed), failed
        generate.probe()
    finally:
        generate.close()


def test_a_cancelled_request_leaves_the_child_at_once_and_others_run_on(process) -> None:
    doomed, neighbour = long_request(process), long_request(process, "Keep going.")
    seen: list = []

    def on_step(chunks) -> None:
        if chunks[0] is not None:
            seen.append(chunks[0])
            if len(seen) == 5:
                process.cancel(doomed)  # from the reader thread, as the replica's finally block does

    done = process.submit([doomed, neighbour], on_step)
    assert wait_until(lambda: bool(seen) and seen[-1].completion_tokens >= 5, 30)
    assert wait_until(lambda: process.live == 1, 30), "the cancelled row kept its slot"
    process.cancel(neighbour)
    done.result(timeout=30)
    assert all(c.finish_reason is None for c in seen)  # no final chunk: nobody is listening
    assert seen[-1].completion_tokens < 100
    assert wait_until(lambda: process.live == 0 and not process.busy, 10)
    process.probe()
    assert run(process, [user_request(process, "Hi", None, max_tokens=4)])[0][2] >= 1


def test_the_replica_hears_the_child_step(process) -> None:
    before = process.last_step_at
    seen = threading.Event()
    request = long_request(process)
    done = process.submit([request], lambda chunks: seen.set())
    assert seen.wait(30) and process.busy
    time.sleep(1.2)  # two beats
    assert process.last_step_at > before and process.live == 1
    process.cancel(request)
    done.result(timeout=30)


def test_a_child_that_dies_fails_what_it_ran_and_the_health_probe(settings) -> None:
    doomed = EngineProcess(settings)
    request = long_request(doomed)
    started = threading.Event()
    done = doomed.submit([request], lambda chunks: started.set())
    assert started.wait(30)
    os.kill(doomed._process.pid, signal.SIGKILL)  # as an out-of-memory kill would
    with pytest.raises(ServiceUnavailableError, match="engine process exited"):
        done.result(timeout=30)
    with pytest.raises(ServiceUnavailableError, match="engine process exited"):
        doomed.probe()
    with pytest.raises(ServiceUnavailableError, match="engine process exited"):
        doomed.submit([long_request(doomed)], lambda chunks: None).result(timeout=5)
    assert not doomed.busy
    doomed.close()


def test_the_child_exits_when_its_replica_goes_away(settings) -> None:
    orphan = EngineProcess(settings)
    done = orphan.submit([long_request(orphan)], lambda chunks: None)
    orphan._outbox.close()  # what the replica's death does to the pipe
    assert orphan._process.wait(timeout=60) == 0
    with pytest.raises(Exception, match="the engine was closed|engine process exited"):
        done.result(timeout=30)


def test_a_model_the_child_cannot_load_fails_the_replica_with_its_traceback(settings) -> None:
    with pytest.raises(RuntimeError, match="could not load the model(.|\n)*no-such-device"):
        EngineProcess(settings.model_copy(update={"device": "no-such-device"}))


# ---- served: a real `serve run`, the engine in its own process ------------------------------------


def engine_processes(server: ServeProcess) -> list[int]:
    """The engine children among the processes of `server`'s session (never anyone else's)."""
    return session_processes(server, lambda argv: b"engine.process.engine_process" in argv)


@pytest.mark.integration
def test_served_the_engine_process_answers_and_a_killed_one_is_replaced(tmp_path: Path) -> None:
    model = yaml.safe_load((ROOT / "configs/models/demo.yaml").read_text())
    model_yaml = tmp_path / "demo-engine-process.yaml"
    model_yaml.write_text(yaml.safe_dump({**model, "engine_process": True}))
    config = config_for_tests(free_port(), {"model": str(model_yaml)},
                              deployments={"VLMServer": {"health_check_period_s": 2, "graceful_shutdown_timeout_s": 5}})
    server = start_server(tmp_path, config)
    try:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png_bytes((64, 64), (220, 20, 20)))}},
            {"type": "text", "text": "What shape is this?"},
        ]}]
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
        assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
        streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            answer.choices[0].message.content
        (child,) = engine_processes(server)

        os.kill(child, signal.SIGKILL)  # as an out-of-memory kill of the engine alone would
        refusals: list[int] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
                break
            except openai.APIStatusError as error:  # until Serve has replaced the replica: OpenAI-shaped 503s
                assert error.status_code == 503 and {"message", "type", "param", "code"} <= set(error.body), error
                refusals.append(error.status_code)
                time.sleep(0.5)
        else:
            pytest.fail("not answering again within 90 s of the engine process's death")
        assert again.choices[0].message.content == answer.choices[0].message.content
        assert refusals, "the dead engine's replica answered as if nothing happened"
        assert [pid for pid in engine_processes(server) if pid != child], "no new engine process"
    finally:
        server.stop()
    # Each child exits once its replica's end of the pipe closes, after its engine thread stops.
    deadline = time.monotonic() + 60
    while engine_processes(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not engine_processes(server), "an engine process outlived its server"
