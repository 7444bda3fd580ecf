#!/usr/bin/env bash
# Fetch, on a machine with network access, the wheels the GPU machine needs and cannot download
# itself (its image has torch 2.11.0+cu130 on Python 3.12 and no network):
#   expecttest==0.3.0        the test suite imports it
#   fbgemm-gpu-genai==1.6.0  FBGEMM's f8i4 grouped GEMM, the peer `python -m inductor_w4a8 bench`
#                            measures against (1.6.0 is the release built for torch 2.11 / CUDA 13)
# into ./.whl of the repo (ignored by git). Carry .whl/ to the GPU machine with the checkout, then
# `source scripts/device_setup.sh` there installs them.
#
#   bash scripts/get_gpu_wheels.sh [DEST]        (DEST default: <repo>/.whl)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$repo/.whl}"
if ! python3 -m pip --version > /dev/null 2>&1; then
  echo "get_gpu_wheels.sh: needs python3 with pip (python3 -m pip)" >&2
  exit 2
fi
mkdir -p "$dest"
# the GPU image is CPython 3.12 on x86-64 manylinux: ask pip for exactly those binaries, whatever
# this machine runs
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest "$dest" expecttest==0.3.0 fbgemm-gpu-genai==1.6.0
echo "wheels in $dest:"
ls -1 "$dest"
echo "next, on the GPU machine, from the repo root with .whl/ carried: source scripts/device_setup.sh"
