#!/bin/bash
# Packs guidellm (benchmarks/guidellm_workload.py) for the leased GPU machine into one
# .devbundle/guidellm.tar.xz (~3.2 MiB): guidellm and those of its dependencies that neither the GPU
# image nor the project's bundle (../shared/tools/device-bundle.sh) has, unpacked, xz-compressed.
#   here:  tools/guidellm_bundle.sh [OUT]            (default .devbundle/guidellm.tar.xz)
#   there: tools/device_e2e.sh with GUIDELLM=RATES unpacks it into /tmp/guidellm.
# Not carried, because the GPU image has them (.library's list of its packages, 2026-11-17): torch,
# transformers, numpy, pandas, pyarrow, fsspec, xxhash, huggingface-hub, httpx, pyyaml, rich, tabulate,
# uvloop, msgpack, protobuf, aiofiles, multidict, wrapt, setuptools, pillow, imageio; from the project's
# bundle: pydantic, websockets, httptools, python-dotenv, sniffio. Their versions there are not pinned
# here: datasets needs pyarrow >= 24 and fsspec <= 2026.9.0 of the image (not checked before a run;
# the device step fails at its first import if they differ).
# click 8.4 is guidellm's pin; it stays in /tmp/guidellm, which only guidellm's process puts on its path.
# The versions are those pip resolved for guidellm 0.8.1 on 2026-12-01.
set -euo pipefail
out=${1:-.devbundle/guidellm.tar.xz}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$tmp/wheels" \
  guidellm==0.8.1 datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1 culsans==0.10.0 aiologic==0.17.1 \
  eval-type-backport==0.4.0 faker==40.63.0 ftfy==6.3.1 wcwidth==0.9.4 loguru==0.7.3 sanic==25.12.1 \
  sanic-routing==23.12.0 html5tagger==2.0.0 tracerite==2.6.5 ujson==6.1.0 h2==4.4.1 hpack==4.2.0 \
  hyperframe==6.1.0 more-itertools==11.2.1 pydantic-settings==2.16.3 click==8.4.2
mkdir -p "$tmp/site" "$(dirname "$out")"
for wheel in "$tmp"/wheels/*.whl; do unzip -qo "$wheel" -d "$tmp/site"; done
tar -cf - -C "$tmp/site" . | xz -T0 -9 > "$out"
ls -la "$out"
