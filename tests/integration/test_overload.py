"""Overload: a burst of 10x what the model stage admits gets fast OpenAI-shaped 503s with
Retry-After for the excess, while the admitted requests keep a bounded latency (issue 9).

The VLMServer is made small on purpose: `max_ongoing_requests: 4` (one batch of 4) and
`max_queued_requests: 4` (Ray Serve's own bound on requests waiting for a replica, counted at each
caller, here the one ingress replica), so it admits 8 requests at a time.
The soak test (test_soak.py) runs on the same server when both modules run in one session.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import pytest

from tests.integration.test_faults import SHORT, Outcome, call, client_for, percentile, record, tally
from tests.support.serving import ServeProcess, config_for_tests, free_port, start_server

pytestmark = pytest.mark.integration

MAX_ONGOING = 4
MAX_QUEUED = 4
CAPACITY = MAX_ONGOING + MAX_QUEUED
BURST = 10 * CAPACITY
ANSWER = {"max_tokens": 200, "extra_body": {"ignore_eos": True}}  # ~1-2 s per batch of 4 on this CPU

_SHARED: dict[str, ServeProcess] = {}


def bounded_server(tmp_path_factory: pytest.TempPathFactory) -> ServeProcess:
    """The small-capacity server, started once per session: test_soak.py runs on it too, which saves
    a server start (a minute or two on 2 cores); it is stopped after the last module using it."""
    server = _SHARED.get("server")
    if server is None or server.process.poll() is not None:
        config = config_for_tests(
            free_port(),
            overrides={"batching": {"max_batch_size": MAX_ONGOING}},
            deployments={
                "VLMServer": {
                    "max_ongoing_requests": MAX_ONGOING,
                    "max_queued_requests": MAX_QUEUED,
                    "user_config": {"max_batch_size": MAX_ONGOING, "batch_wait_timeout_s": 0.05},
                },
                # One preprocessor replica throughout, so the soak test can follow its memory.
                "ImagePreprocessor": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
            },
        )
        server = start_server(tmp_path_factory.mktemp("bounded"), config)
        _SHARED["server"] = server
    return server


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = bounded_server(tmp_path_factory)
    yield process
    if not any(item.path.name == "test_soak.py" for item in request.session.items):
        process.stop()  # else test_soak.py stops it when done


BURSTS: dict[str, list[Outcome]] = {}


def test_a_burst_of_ten_times_capacity_gets_fast_503s_and_admitted_latency_stays_bounded(server: ServeProcess) -> None:
    client = client_for(server, timeout=120)
    # The same request alone, for scale: this machine's speed varies with what else runs on it.
    alone = call(client, "Count.", False, **ANSWER)
    assert alone.kind == "ok", alone

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        outcomes = list(pool.map(lambda i: call(client, f"Count to {i}.", i % 2 == 0, **ANSWER), range(BURST)))
    wall = time.monotonic() - started
    BURSTS["model"] = outcomes

    admitted = [o for o in outcomes if o.kind == "ok"]
    refused = [o for o in outcomes if o.status == 503]
    ok_s = [o.seconds for o in admitted]
    refused_s = [o.seconds for o in refused]
    summary = (
        f"burst {BURST}: {tally(outcomes)}; alone {alone.seconds:.2f}s; "
        f"admitted P50 {percentile(ok_s, 50):.2f}s P99 {percentile(ok_s, 99):.2f}s; "
        f"503 P50 {percentile(refused_s, 50):.2f}s P99 {percentile(refused_s, 99):.2f}s; wall {wall:.1f}s"
    )
    print(summary)
    record(
        "Overload burst",
        f"{BURST} concurrent requests of 200 tokens (half streaming) = 10x what the VLMServer admits "
        f"(max_ongoing_requests {MAX_ONGOING} + max_queued_requests {MAX_QUEUED})",
        outcomes=tally(outcomes),
        alone_s=round(alone.seconds, 2),
        admitted_p50_s=round(percentile(ok_s, 50), 2),
        admitted_p99_s=round(percentile(ok_s, 99), 2),
        refused_p50_s=round(percentile(refused_s, 50), 2),
        refused_p99_s=round(percentile(refused_s, 99), 2),
        retry_after=sorted({o.headers.get("retry-after", "none") for o in refused}),
    )

    # Nothing but answers and 503s; nobody hung.
    assert all(o.kind == "ok" or o.status == 503 for o in outcomes), summary
    # The excess was refused, and at least one batch was let in.
    assert len(admitted) >= MAX_ONGOING, summary
    assert len(refused) >= BURST // 2, summary
    # Refusals name when to come back, and come fast: sooner than the answers they stand in for.
    assert all(int(o.headers.get("retry-after", "0")) >= 1 for o in refused), summary
    assert percentile(refused_s, 99) < max(5.0, 2 * alone.seconds), summary
    assert percentile(refused_s, 50) < percentile(ok_s, 50), summary
    # Admitted requests wait for at most the batches ahead of them (queue of 4 = one batch), with
    # a generous margin for a shared machine.
    assert percentile(ok_s, 99) < 6 * alone.seconds + 10, summary
    # And the service is fine afterwards.
    assert call(client, "Still there?", False, **SHORT).kind == "ok"


def test_the_503s_of_a_burst_are_openai_shaped() -> None:
    outcomes = BURSTS.get("model")
    if outcomes is None:
        pytest.skip("the burst test did not run")
    refused = [o for o in outcomes if o.status == 503]
    assert refused and all(o.kind == "error" and o.detail.startswith("503 server_error") for o in refused), tally(outcomes)
