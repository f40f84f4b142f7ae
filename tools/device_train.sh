#!/bin/bash
# Train the demo model on a leased GPU machine (the project's `device` tool: torch and
# transformers there, no network, no pydantic). Several configurations may train side by side;
# the best by held-out accuracy is packed into $OUT as 15 MB tar parts (the tool returns files of
# at most 16 MiB). What that machine lacks travels in .devbundle/ or .whl/ (tools/device_env.sh).
#
#   bash tools/device_train.sh BUDGET_S "NAME:key=value key=value" ["NAME2:..."]
#   INIT=ckpt_in/export-X bash tools/device_train.sh 300 "F:lr=3e-4 warmup_steps=100"   # continue
#
# Side by side, the runs share the GPU by time-slicing: each is about as slow as all of them
# together would be one after another, so use it to compare configurations, not to go faster.
set -o pipefail
source tools/device_env.sh || exit 1
BUDGET=$1; shift
INIT=${INIT:-}
mkdir -p logs
pids=()
for spec in "$@"; do
  name=${spec%%:*}; sets=${spec#*:}
  extra=""; [ -n "$INIT" ] && extra="--init-from $INIT"
  timeout $((BUDGET + 110)) python3 -m demo.train --out logs/$name --export logs/export-$name --eval ${EVAL_N:-500} $extra \
     --set time_budget_s=$BUDGET num_workers=4 eval_every=500 eval_samples=250 $sets 2>&1 | grep -v "^step [0-9]*/" > $OUT/$name.log &
  pids+=($!)
done
sleep ${SMI_AFTER:-90}; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv | tee $OUT/smi.txt
wait "${pids[@]}"
python3 - <<PY > $OUT/summary.txt
import json, glob, os
best=None
for f in sorted(glob.glob("logs/*/test_eval.json")):
    r=json.load(open(f)); name=f.split("/")[1]
    print(name, r["overall"], r["per_type"])
    if best is None or r["overall"]>best[1]: best=(name, r["overall"])
print("BEST", best[0] if best else None)
PY
cat $OUT/summary.txt
best=$(awk '/^BEST/{print $2}' $OUT/summary.txt)
[ -n "$best" ] && [ -d logs/export-$best ] || exit 1
cp logs/$best/loss_log.jsonl logs/$best/test_eval.json logs/$best/train_config.yaml logs/export-$best/
tar cf - -C logs export-$best | split -b 15M - $OUT/ckpt.tar.part-
ls -la $OUT
