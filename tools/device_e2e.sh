#!/bin/bash
# End to end on the leased GPU machine, and the serving overhead: first the model stage alone
# (benchmarks/engine_bench.py, the continuous engine with the same settings as the served config:
# CUDA graphs and torch.compile), then the whole Ray application (ingress, preprocessing, model stage)
# serving GLM-4.6V-Flash's shape with random weights, driven over HTTP by `vlm-serve bench` with
# the same workload; benchmarks/serving_overhead.py prints the ratio per concurrency level.
#   here:  ../shared/tools/device-bundle.sh && tools/device_site.sh
#   run(command="bash tools/device_e2e.sh 1,8,32", carry=[".devbundle"])      (about 5 minutes)
# Arguments: the concurrency levels; each sends max(N, 4) requests at concurrency N (one burst).
# Every figure lands in $OUT: engine.json, e2e-cN.json per level, overhead.json, serve.log, timeline.txt
# (benchmarks/burst_timeline.py: when each burst's requests reached each stage) and, with TOP=1,
# top.log (the processes' CPU use, sampled every second while the benches run);
# with STREAM_INTERVALS (below), e2e-cN-iX.json and overhead-iX.json per interval X; with SUSTAINED=K,
# e2e-cN-sustained.json too: K x N requests at concurrency N, against the engine's closed loop of as many.
# GUIDELLM=2,4,8 (carry .devbundle/guidellm.tar.xz, made here by tools/guidellm_bundle.sh): after those, the
# realistic open-loop load at each Poisson rate (benchmarks/guidellm_workload.py: images 224..1024 a side,
# 1-3 a request, 16..512 output tokens; GUIDELLM_REQUESTS a rate, default 120; GUIDELLM_ARGS for more of
# its options), goodput next to throughput: $OUT/guidellm/ (scenario, guidellm's report, summary), guidellm.log.
set -o pipefail
source tools/device_env.sh || exit 1
levels=${1:-1,8,32}
# Fail in a second, not after the ready timeout, when the application cannot even be imported.
python3 -c "import deployments.app, serve_app.cli.bench, openai" || exit 1
if [ -n "${GUIDELLM:-}" ]; then  # guidellm's packages (its step, below), importable with the image's pyarrow and fsspec
  rm -rf /tmp/guidellm && mkdir -p /tmp/guidellm && tar -xJf .devbundle/guidellm.tar.xz -C /tmp/guidellm || exit 1
  PYTHONPATH=/tmp/guidellm:$PYTHONPATH python3 -c "import guidellm.benchmark.entrypoints, guidellm.data.deserializers, \
guidellm.backends.openai" || exit 1
fi
if [ -n "${PREFILL_PROFILE:-}" ]; then  # where prefill's time goes (benchmarks/prefill_profile.py)
  python3 benchmarks/prefill_profile.py --random-glm46v-shape --dtype bfloat16 --batch-sizes "$levels" \
    --profile-batch "${levels##*,}" --json "$OUT/prefill.json" || exit 1
fi
# The engine options as configs/models/glm-4.6v-flash-dummy.yaml has them (SKIP_ENGINE=1: keep the
# $OUT/engine.json an earlier run of this script left in the same call, to compare two server settings).
[ -n "${SKIP_ENGINE:-}" ] || python3 benchmarks/engine_bench.py --random-glm46v-shape --dtype bfloat16 --batch-sizes "$levels" \
  --new-tokens 128 --image-size 448x448 --engines continuous --cuda-graphs --compile --warmup-max-len 1024 \
  --max-prefill-tokens 4096 ${SUSTAINED:+--sustained "$SUSTAINED"} \
  --json "$OUT/engine.json" 2>&1 | grep -v "Captured the decode step"
# Its exit status says whether greedy outputs equal generate()'s, which random bf16 weights' flat
# logits do not keep for long (benchmarks/RESULTS.md); what matters here is that it wrote figures.
[ -s "$OUT/engine.json" ] || exit 1
python3 benchmarks/glm46v_shape.py checkpoints/glm-4.6v-flash-shape || exit 1
serve run configs/serve/glm-4.6v-shape-bench.yaml > "$OUT/serve.log" 2>&1 &
server=$!
started=$(date +%s)
until curl -sf http://127.0.0.1:8000/v1/models > /dev/null; do
  if ! kill -0 $server 2> /dev/null || grep -q "Deploying app 'vlm' failed" "$OUT/serve.log" \
      || (( $(date +%s) - started > ${READY_TIMEOUT_S:-420} )); then
    echo "the server did not come up"; tail -50 "$OUT/serve.log"; kill $server 2> /dev/null; exit 1
  fi
  sleep 2
done
echo "ready after $(( $(date +%s) - started )) s"
if [ -n "${PYSPY:-}" ]; then  # PYSPY=30: which threads of the model replica hold the GIL, sampled for 30 s
  python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .devbundle/py_spy-*.whl || exit 1
  replica=$(pgrep -f "ServeReplica:vlm:VLMServer" | head -1)
  /tmp/pyspy/bin/py-spy record --gil --threads --nonblocking --rate 250 --format raw --duration "$PYSPY" --pid "$replica" \
    --output "$OUT/pyspy-vlm.txt" > "$OUT/pyspy.log" 2>&1 &
fi
if [ -n "${TOP:-}" ]; then  # which processes hold the CPUs while the benches run: $OUT/top.log
  top -b -d 1 -w 200 -c > "$OUT/top.log" 2>&1 &
  sampler=$!
fi
# bench CONCURRENCY REQUESTS WARMUP OUTPUT_TOKENS [more vlm-serve bench options]
bench() {
  python3 -m serve_app.cli.main bench --concurrency "$1" --num-requests "$2" --warmup "$3" --output-tokens "$4" \
    --image-size 448x448 --no-progress "${@:5}"
}
# STREAM_INTERVALS="0 0.05": the levels again for each value of the VLMServer's stream_interval_s,
# set live on the running replica (its reconfigure, as a user_config change calls it).
for interval in ${STREAM_INTERVALS:-none}; do
  suffix=""
  if [ "$interval" != none ]; then
    suffix="-i$interval"
    python3 - "$interval" <<'PY' || exit 1
import sys, yaml, ray
from ray import serve
config = yaml.safe_load(open("configs/serve/glm-4.6v-shape-bench.yaml"))
vlm = next(d for d in config["applications"][0]["deployments"] if d["name"] == "VLMServer")
ray.init(address="auto", log_to_driver=False)
serve.get_deployment_handle("VLMServer", app_name="vlm").reconfigure.remote(
    {**vlm["user_config"], "stream_interval_s": float(sys.argv[1])}).result()
print(f"stream_interval_s = {sys.argv[1]}")
PY
  fi
  reports=()
  for c in ${levels//,/ }; do
    # Untimed: one burst of 2-token answers at this concurrency, as engine_bench.py warms each level
    # up before timing it (the first burst a fresh server meets pays for its first shapes).
    bench "$c" "$c" 0 2 > /dev/null 2>&1
    for run in $(seq "${REPEATS:-1}"); do  # REPEATS=5: five bursts per level (one burst varies by ~10%)
      # WARMUP=c: as many warm-up requests as the level's concurrency, sent at once (the run starts on
      # open connections); WARMUP="1 c": both, one after the other in each repeat (e2e-cN-w1, -wc)
      for warmup in ${WARMUP:-1}; do
        tag=""; [ "${WARMUP:-1}" != "$warmup" ] && tag="-w$warmup"
        [ "$warmup" = c ] && warmup=$c
        name="$OUT/e2e-c$c$suffix$tag$([ "${REPEATS:-1}" -gt 1 ] && echo "-r$run").json"
        bench "$c" $(( c > 4 ? c : 4 )) "$warmup" 128 --out "$name" 2>&1 | tail -7
        reports+=("$name")
        if [ -n "${SUSTAINED:-}" ]; then  # SUSTAINED=K: also K x C requests at concurrency C (engine: --sustained K)
          bench "$c" $(( SUSTAINED * c )) "$warmup" 128 --out "${name%.json}-sustained.json" 2>&1 | tail -7
          reports+=("${name%.json}-sustained.json")
        fi
      done
    done
  done
  python3 benchmarks/serving_overhead.py "$OUT/engine.json" "${reports[@]}" --json "$OUT/overhead$suffix.json"
done
if [ -n "${GUIDELLM:-}" ]; then
  # guidellm's packages go first on its own path only, so its pins (click 8.4) never reach Ray. Four client
  # processes and 5 s to start them: requests leave on their Poisson schedule (the summary's "late p95 ms").
  # The first and last 10% of each rate's requests are left out of its figures (new shapes, the drain).
  PYTHONPATH=/tmp/guidellm:$PYTHONPATH GUIDELLM__MAX_WORKER_PROCESSES=4 GUIDELLM__SCHEDULER_START_DELAY_NON_DISTRIBUTED=5 \
    python3 benchmarks/guidellm_workload.py --target http://127.0.0.1:8000 --rates "$GUIDELLM" \
    --max-requests "${GUIDELLM_REQUESTS:-120}" --warmup 0.1 --cooldown 0.1 --out "$OUT/guidellm" \
    --guidellm "python3 -m guidellm" ${GUIDELLM_ARGS:-} > "$OUT/guidellm.log" 2>&1 \
    || { echo "benchmarks/guidellm_workload.py failed:"; tail -30 "$OUT/guidellm.log"; }
  sed -n '/^goodput: /,$p' "$OUT/guidellm.log"
fi
[ -n "${sampler:-}" ] && kill $sampler
# A background job ignores SIGINT in a script, so `serve run` is not stopped that way: stop Ray itself.
pkill -P $server; kill $server 2> /dev/null; python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
python3 benchmarks/burst_timeline.py "$OUT/serve.log" > "$OUT/timeline.txt" 2>&1
