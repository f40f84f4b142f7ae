#!/bin/bash
# End to end on the leased GPU machine: the whole Ray application (ingress, preprocessing, model
# stage) serving GLM-4.6V-Flash's shape with random weights, driven over HTTP by `vlm-serve bench`.
#   run(command="bash tools/device_e2e.sh 1,8,32", carry=[".devbundle"] (tools/device_site.sh))
# Arguments: the concurrency levels (each sends 2 x its concurrency requests, at least 4).
# Every figure lands in $OUT: e2e-cN.json per level, and serve.log.
set -o pipefail
source tools/device_env.sh || exit 1
levels=${1:-1,8,32}
# Fail in a second, not after the ready timeout, when the application cannot even be imported.
python3 -c "import serve_app.app" || exit 1
python3 benchmarks/glm46v_shape.py checkpoints/glm-4.6v-flash-shape || exit 1
serve run configs/serve/glm-4.6v-shape-bench.yaml > "$OUT/serve.log" 2>&1 &
server=$!
started=$(date +%s)
until curl -sf http://127.0.0.1:8000/v1/models > /dev/null; do
  if ! kill -0 $server 2> /dev/null || grep -q "Deploying app 'vlm' failed" "$OUT/serve.log" \
      || (( $(date +%s) - started > ${READY_TIMEOUT_S:-240} )); then
    echo "the server did not come up"; tail -50 "$OUT/serve.log"; kill $server 2> /dev/null; exit 1
  fi
  sleep 2
done
echo "ready after $(( $(date +%s) - started )) s"
for c in ${levels//,/ }; do
  n=$(( 2 * c > 4 ? 2 * c : 4 ))
  python3 -m serve_app.cli bench --concurrency "$c" --num-requests "$n" --image-size 448x448 --output-tokens 128 \
    --no-progress --out "$OUT/e2e-c$c.json" 2>&1 | tail -7
done
kill -INT $server; wait $server
grep -a "Continuous engine\|Captured [0-9]* decode" "$OUT/serve.log" | tail -3
