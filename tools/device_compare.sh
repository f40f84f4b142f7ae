#!/bin/bash
# The engine alone on the leased GPU, this tree against an earlier commit's tree, in one call, with
# the settings of configs/models/glm-4.6v-flash-dummy.yaml (CUDA graphs, torch.compile):
#   here:  mkdir -p .baseline && git archive COMMIT serve_app deployments engine benchmarks tools configs \
#              | tar -x -C .baseline        (.baseline is ignored by git)
#   run(command="bash tools/device_compare.sh 1,32", carry=[".devbundle/site.tar.xz", ".baseline"])
# Writes $OUT/engine-new.json and $OUT/engine-base.json; the order alternates nothing, so run it
# twice with BASE_FIRST=1 to see the machine's drift. SUSTAINED=K adds the closed loop of K x B
# requests with B in flight (engine_bench.py --sustained).
set -o pipefail
source tools/device_env.sh || exit 1
levels=${1:-1,32}
bench() {  # DIR OUTPUT
  (cd "$1" && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/engine_bench.py --random-glm46v-shape --dtype bfloat16 \
     --batch-sizes "$levels" --new-tokens 128 --image-size 448x448 --engines continuous --cuda-graphs --compile \
     --warmup-max-len 1024 --max-prefill-tokens 4096 --sustained "${SUSTAINED:-0}" --json "$2" 2>&1 \
     | grep -v "Captured the decode step" | tail -25)
}
if [ -n "${BASE_FIRST:-}" ]; then bench .baseline "$OUT/engine-base.json"; bench . "$OUT/engine-new.json"
else bench . "$OUT/engine-new.json"; bench .baseline "$OUT/engine-base.json"; fi
ls -la "$OUT"
