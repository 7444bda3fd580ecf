#!/usr/bin/env bash
# Source this on the GPU machine (from the repo root, with .whl/ carried: scripts/get_gpu_wheels.sh fetches it):
# installs the carried wheels into /tmp/site and makes the package importable, editable if pip can.
if ! ls .whl/*.whl > /dev/null 2>&1; then
  echo "device_setup.sh: no wheels in .whl/; run scripts/get_gpu_wheels.sh on a machine with network and carry .whl/" >&2
  return 1
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PATH="$PATH:/usr/local/cuda/bin"  # compute-sanitizer for the memcheck tests
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip_e.log 2>&1; then
  echo "pip install -e . failed (tail below); falling back to PYTHONPATH"; grep -iE "error|Error" /tmp/pip_e.log | head -8; cp /tmp/pip_e.log ${OUT:-/tmp}/pip_e.log 2>/dev/null
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c "import torch, triton, inductor_w4a8.lowerings as l; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
