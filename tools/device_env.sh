#!/bin/bash
# Source on the leased GPU machine (the project's `device` tool: torch and transformers there, no
# pydantic, no Ray, no network) before running the project's code:
#   run(command="source tools/device_env.sh && python3 benchmarks/engine_bench.py ...", carry=[".devbundle"])
# It unpacks .devbundle/site.tar.xz (tools/device_site.sh: transformers 5.24, Pillow, pydantic,
# FastAPI, openai, Ray Serve and its dependencies) into /tmp/site, or else installs the wheels of
# .whl/ (carry=[".whl"]: the model stage without Ray).
set -o pipefail
rm -rf /tmp/site && mkdir -p /tmp/site
if [ -f .devbundle/site.tar.xz ]; then
  tar -xJf .devbundle/site.tar.xz -C /tmp/site || return 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || return 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_DEDUP_LOGS=0 PATH=/tmp/site/bin:$PATH
serve() { python3 -m ray.serve.scripts "$@"; }
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
