#!/bin/bash
# Quantization on the GPU machine (issue 24), the engine alone, every variant in one call beside bf16:
#   run(command="bash tools/device_quant.sh", carry=[".whl"])      # .whl: tools/device_env.sh's wheels + gemlite
# Writes $OUT/<variant>.json; the figures go to benchmarks/RESULTS.md.
# BATCHES (default 1,32) and VARIANTS (default "bf16 splitk4 splitk8") choose what runs; the others
# are bf16-kv (bf16 weights, the bf16 and int8 KV caches), tinygemm4, gemlite4 and gemlite8.
set -o pipefail
rm -rf .devbundle  # the engine alone: device_env.sh installs .whl
source tools/device_env.sh || exit 1
mkdir -p "$OUT"
common=(--random-glm46v-shape --dtype bfloat16 --batch-sizes "${BATCHES:-1,32}" --new-tokens 128
        --image-size 448x448 --engines continuous --cuda-graphs --compile --warmup-max-len 1024
        --max-prefill-tokens 4096)
for variant in ${VARIANTS:-bf16 splitk4 splitk8}; do
  case $variant in
    bf16) extra=() ;;
    bf16-kv) extra=(--kv-cache none,int8) ;;
    splitk4) extra=(--weights gptq4 --gptq-backend splitk) ;;
    splitk8) extra=(--weights gptq8 --gptq-backend splitk) ;;
    tinygemm4) extra=(--weights gptq4 --gptq-backend tinygemm) ;;
    gemlite4) extra=(--weights gptq4 --gptq-backend gemlite) ;;
    gemlite8) extra=(--weights gptq8 --gptq-backend gemlite) ;;
    *) echo "unknown variant $variant"; exit 2 ;;
  esac
  echo "== $variant"
  python3 benchmarks/engine_bench.py "${common[@]}" "${extra[@]}" --json "$OUT/$variant.json" 2>&1 \
    | grep -v -e Warning -e warn
done
