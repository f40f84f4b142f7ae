#!/bin/bash
# Several GPU replicas on one leased two-GPU machine (issue 28): the whole application serving
# GLM-4.6V-Flash's shape with random weights (configs/serve/glm-4.6v-shape-bench.yaml, changed per phase),
# driven over HTTP by `vlm-serve bench`:
#   here:  ../shared/tools/device-bundle.sh && tools/device_site.sh
#   run(command="bash tools/device_multi_gpu.sh", kind="nvidia-h200-x2", carry=[".devbundle"])
# Phases, each a `serve deploy` onto one Ray head with both GPUs:
#   1. throughput with 1, then 2 VLMServer replicas: 64 concurrent, 448x448, 128 output tokens
#      ($OUT/tput-r1.json, tput-r2.json);
#   2. the multi-turn replay (6 turns) over 2 replicas with Ray's default router, then with the
#      prefix-affinity router, each on conversations of its own (--seed): prefix hit rate and TTFT P50
#      ($OUT/turns-default.json, turns-prefix_affinity.json);
#   3. autoscaling between 1 and 2 replicas under a rising load (8, 16, 32, 64 concurrent): time until the
#      second replica runs, failed requests, then the time until it is removed once the load stops
#      ($OUT/rise-cN.json, replicas.log: seconds and running VLMServer replicas, sampled every second).
# $OUT/summary.txt: every figure; serve.log: Ray's and Serve's logs.
set -o pipefail
source tools/device_env.sh || exit 1
python3 -c "import deployments.app, serve_app.cli.bench, openai" || exit 1
python3 benchmarks/glm46v_shape.py checkpoints/glm-4.6v-flash-shape || exit 1
python3 -m ray.scripts.scripts start --head --num-gpus 2 --disable-usage-stats > "$OUT/serve.log" 2>&1 || exit 1
trap 'python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1' EXIT

# deploy NAME ROUTER REPLICAS|auto: the shape-bench config with the VLMServer's replicas (or autoscaling
# between 1 and 2 on queue depth, as configs/serve/glm-4.6v-flash-bf16-multi-gpu.yaml does with quicker
# delays) and the router, deployed; returns once that many replicas run (1 for auto) and the API answers.
deploy() {
  python3 - "$@" <<'PY' || return 1
import sys, yaml
name, router, replicas = sys.argv[1:]
config = yaml.safe_load(open("configs/serve/glm-4.6v-shape-bench.yaml"))
app = config["applications"][0]
app["args"]["routing"] = {"router": router, "affinity_queue_bound": 48}
vlm = next(d for d in app["deployments"] if d["name"] == "VLMServer")
vlm.pop("num_replicas", None)
if replicas == "auto":
    vlm["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 24,
                                 "upscale_delay_s": 10, "downscale_delay_s": 30}
else:
    vlm.pop("autoscaling_config", None)
    vlm["num_replicas"] = int(replicas)
yaml.safe_dump(config, open(f"/tmp/multi-{name}.yaml", "w"))
PY
  serve deploy "/tmp/multi-$1.yaml" >> "$OUT/serve.log" 2>&1 || return 1
  local want=$3 started=$(date +%s)
  [ "$want" = auto ] && want=1
  until [ "$(running)" = "$want" ] && curl -sf http://127.0.0.1:8000/v1/models > /dev/null; do
    if (( $(date +%s) - started > ${READY_TIMEOUT_S:-600} )); then
      echo "$1: $want VLMServer replicas did not come up"; serve status; return 1
    fi
    sleep 3
  done
  echo "$1: $want replica(s) ready after $(( $(date +%s) - started )) s" | tee -a "$OUT/summary.txt"
}
# The VLMServer's running replicas now.
running() {
  python3 - <<'PY' 2> /dev/null
import ray
from ray import serve
ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
status = serve.status().applications.get("vlm")
states = status.deployments["VLMServer"].replica_states if status and "VLMServer" in status.deployments else {}
print(sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING"))
PY
}
bench() {  # CONCURRENCY REQUESTS OUT [more vlm-serve bench options]
  python3 -m serve_app.cli.main bench --concurrency "$1" --num-requests "$2" --warmup 1 --output-tokens 128 \
    --image-size 448x448 --no-progress --out "$3" "${@:4}" 2>&1 | tail -7
}

# 1. Throughput with 1 and 2 replicas, the same workload and call.
for replicas in 1 2; do
  deploy "r$replicas" default "$replicas" || exit 1
  bench 64 64 /dev/null > /dev/null  # untimed: the first burst pays for its first shapes
  bench 64 192 "$OUT/tput-r$replicas.json"
done

# 2. The multi-turn replay, default router then prefix affinity (both with 2 replicas).
seed=1
for router in default prefix_affinity; do
  deploy "turns-$router" "$router" 2 || exit 1
  python3 -m serve_app.cli.main bench --multi-turn --turns 6 --num-requests 32 --concurrency 16 \
    --seed "$seed" --no-progress --out "$OUT/turns-$router.json" 2>&1 | tail -12
  seed=$(( seed + 1 ))
done

# 3. Autoscaling: from 1 replica under a rising load, then idle until it scales back down.
deploy auto prefix_affinity auto || exit 1
t0=$(date +%s)
( while true; do echo "$(( $(date +%s) - t0 )) $(running)"; sleep 1; done ) > "$OUT/replicas.log" &
sampler=$!
for c in 8 16 32 64; do
  bench "$c" $(( 4 * c )) "$OUT/rise-c$c.json"
done
load_end=$(( $(date +%s) - t0 ))
until [ "$(running)" = 1 ] || (( $(date +%s) - t0 - load_end > 300 )); do sleep 5; done
sleep 2; kill $sampler

python3 - "$OUT" "$load_end" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out, load_end = Path(sys.argv[1]), int(sys.argv[2])
def load(name):
    return json.loads((out / name).read_text())
t1, t2 = (load(f"tput-r{n}.json")["summary"]["output_tokens_per_s"] for n in (1, 2))
print(f"throughput at 64 concurrent: 1 replica {t1:,.0f} tok/s, 2 replicas {t2:,.0f} tok/s ({t2 / t1:.2f}x)")
for router in ("default", "prefix_affinity"):
    report = load(f"turns-{router}.json")
    prompt = sum(r["prompt_tokens"] or 0 for r in report["requests"] if r["ok"])
    cached = sum(r["cached_tokens"] or 0 for r in report["requests"] if r["ok"])
    s = report["summary"]
    print(f"multi-turn, {router} router: prefix hit rate {cached / max(prompt, 1):.1%}, "
          f"TTFT P50 {s['ttft_s']['p50'] * 1000:.0f} ms, failures {s['failures']}")
samples = [tuple(map(int, line.split())) for line in (out / "replicas.log").read_text().splitlines()
           if len(line.split()) == 2]
up = next((t for t, n in samples if n >= 2), None)
down = next((t for t, n in samples if t > load_end and n == 1), None)
failed = sum(load(f"rise-c{c}.json")["summary"]["failures"] for c in (8, 16, 32, 64))
print(f"autoscaling: second replica running {up} s after the load began; {failed} failed requests; "
      f"back to 1 replica {None if down is None else down - load_end} s after the load stopped")
PY
