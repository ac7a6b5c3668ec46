#!/usr/bin/env bash
# bench/gpu.py on a GPU machine, in one command: bench/gpu.sh --models schnell,dev,zimage --runs 10
#
# Uses the machine's python3 with its CUDA PyTorch. Wheels that bench/gpu_wheels.sh saved in bench/.wheels
# (for a machine without PyPI) are installed first into a folder of their own that comes before the
# machine's packages on the path; Kiln itself runs from this checkout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-python3}
path="$root"
if compgen -G "$here/.wheels/*.whl" > /dev/null; then
  site=${KILN_BENCH_SITE:-/tmp/kiln-bench-site}
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$here"/.wheels/*.whl
  path="$site:$path"
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" "$here/gpu.py" "$@"
