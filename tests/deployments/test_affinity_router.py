"""The prefix-affinity router (deployments/affinity_router.py): its routing key, its choice, its wiring."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from deployments import options
from deployments.affinity_router import ReplicaLoad, choose, conversation_key, rendezvous_order
from serve_app.openai.conversation import split_request
from serve_app.openai.protocol import ChatCompletionRequest
from serve_app.settings import AppArgs, IngressSettings, RoutingSettings
from serve_app.stage_types import GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = [f"r{i}" for i in range(4)]


def _image(content: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(content).decode()}}


def _key(messages: list[dict], salt: str | None = None) -> str | None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "cache_salt": salt})
    return conversation_key(*split_request(request, IngressSettings()), salt)


def _first(text: str = "What is in this picture?", image: bytes = b"cat") -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, _image(image)]}


# ---- the routing key ------------------------------------------------------------------------------


def test_the_same_first_turn_with_the_same_image_gives_the_same_key() -> None:
    assert _key([_first()]) == _key([_first()]) is not None


def test_a_different_image_or_text_or_salt_gives_another_key() -> None:
    keys = {_key([_first()]), _key([_first(image=b"dog")]), _key([_first(text="And this?")]),
            _key([_first()], salt="tenant-a")}
    assert len(keys) == 4


def test_later_turns_keep_the_key_of_the_first() -> None:
    turns = [_first()]
    first = _key(turns)
    for i in range(3):
        turns += [{"role": "assistant", "content": f"answer {i}"},
                  {"role": "user", "content": [{"type": "text", "text": f"and {i}?"}, _image(bytes([i]))]}]
        assert _key(turns) == first


def test_the_system_prompt_before_the_first_turn_is_part_of_the_key() -> None:
    assert _key([{"role": "system", "content": "Be brief."}, _first()]) != _key([_first()])


# ---- the choice -----------------------------------------------------------------------------------


def _idle(ids: list[str] = REPLICAS) -> list[ReplicaLoad]:
    return [ReplicaLoad(r, 0) for r in ids]


def test_a_key_always_goes_to_the_same_replica() -> None:
    assert len({choose("conversation-1", _idle(), bound=8) for _ in range(20)}) == 1
    # The order the candidates come in does not matter.
    assert choose("conversation-1", _idle()[::-1], bound=8) == choose("conversation-1", _idle(), bound=8)


def test_keys_spread_evenly_over_the_replicas() -> None:
    counts = Counter(choose(f"k{i}", _idle(), bound=8) for i in range(4000))
    assert set(counts) == set(REPLICAS)
    assert all(800 < n < 1200 for n in counts.values()), counts  # 1000 each, a few sigma either way


def test_removing_a_replica_moves_only_its_keys_and_adding_it_back_restores_them() -> None:
    keys = [f"k{i}" for i in range(2000)]
    before = {k: choose(k, _idle(), bound=8) for k in keys}
    after = {k: choose(k, _idle(REPLICAS[:-1]), bound=8) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == REPLICAS[-1]}
    assert {k: choose(k, _idle(), bound=8) for k in keys} == before


def test_a_busy_home_replica_sends_the_request_to_the_least_loaded() -> None:
    home, second, *_ = rendezvous_order("c", REPLICAS)
    loads = {r: 5 for r in REPLICAS} | {home: 9}
    least = next(r for r in REPLICAS if r not in (home, second))
    loads[least] = 1
    candidates = [ReplicaLoad(r, n) for r, n in loads.items()]
    assert choose("c", candidates, bound=8) == least
    assert choose("c", candidates, bound=9) == home  # at the bound it still goes home
    # Among equally loaded others, the key's next preference: an overflowing conversation stays together.
    assert choose("c", [ReplicaLoad(r, 0) for r in REPLICAS if r != home] + [ReplicaLoad(home, 9)], 8) == second


def test_an_unknown_load_counts_as_idle_and_a_lone_replica_takes_everything() -> None:
    home = rendezvous_order("c", REPLICAS)[0]
    assert choose("c", [ReplicaLoad(r, None if r == home else 3) for r in REPLICAS], bound=2) == home
    assert choose("c", [ReplicaLoad("only", 100)], bound=8) == "only"


def test_without_a_key_the_least_loaded_replica_is_chosen() -> None:
    loads = [ReplicaLoad("a", 4), ReplicaLoad("b", 1), ReplicaLoad("c", 7)]
    assert {choose(None, loads, bound=8) for _ in range(20)} == {"b"}
    # Ties are broken at random, so keyless requests do not pile onto one replica.
    assert {choose(None, _idle(), bound=8) for _ in range(200)} == set(REPLICAS)


def test_no_candidate_is_an_error() -> None:
    with pytest.raises(ValueError):
        choose("c", [], bound=8)


# ---- wiring ---------------------------------------------------------------------------------------


def test_the_default_router_adds_no_options_and_prefix_affinity_names_the_router() -> None:
    assert options.vlm_request_router(RoutingSettings()) == {}
    config = options.vlm_request_router(RoutingSettings(router="prefix_affinity", affinity_queue_bound=12))
    router = config["request_router_config"]
    assert router.get_request_router_class().__name__ == "PrefixAffinityRouter"
    assert router.request_router_kwargs == {"bound": 12}


def test_the_multi_gpu_config_is_a_valid_serve_config_with_the_affinity_router() -> None:
    config = yaml.safe_load((ROOT / "configs" / "serve" / "glm-4.6v-flash-bf16-multi-gpu.yaml").read_text())
    app = ServeDeploySchema.model_validate(config).applications[0]
    args = AppArgs.model_validate(app.args)
    assert args.routing.router == "prefix_affinity"
    vlm = next(d for d in app.deployments if d.name == "VLMServer")
    assert vlm.ray_actor_options.num_gpus == 1
    assert vlm.autoscaling_config["min_replicas"] == 1 < vlm.autoscaling_config["max_replicas"]


# ---- under Ray Serve ------------------------------------------------------------------------------


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class _WhichReplica:
    """Answers with the id of the replica that got the request."""

    async def generate(self, request: GenerationRequest) -> str:
        return serve.get_replica_context().replica_id.unique_id


def test_under_serve_each_conversation_keeps_to_one_replica_and_conversations_use_both() -> None:
    """Two CPU replicas behind the router, as build_app configures it (~20 s: a local Ray and Serve)."""
    router = options.vlm_request_router(RoutingSettings(router="prefix_affinity", affinity_queue_bound=8))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(_WhichReplica.options(**router).bind(), name="affinity", route_prefix=None)
        sampling = SamplingParams(max_tokens=1)
        turns = {
            key: {handle.generate.remote(GenerationRequest([], [], sampling, routing_key=key)).result()
                  for _turn in range(6)}
            for key in (f"conversation-{i}" for i in range(24))
        }
        assert all(len(replicas) == 1 for replicas in turns.values()), turns
        assert len(set.union(*turns.values())) == 2, turns
    finally:
        serve.shutdown()
        ray.shutdown()
