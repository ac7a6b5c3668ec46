#!/usr/bin/env bash
# Save in bench/.wheels the wheels that bench/gpu.sh installs on a GPU machine that cannot reach PyPI:
# the runtime dependencies of Kiln that a CUDA PyTorch image usually lacks, at this checkout's .venv
# versions, built for CPython 3.12 on x86-64 Linux, and torchao for the fp8 precision. Run it where PyPI
# is reachable and carry bench/.wheels along with the checkout (about 10 MB).
#
#   PYTHON_VERSION=3.12   the GPU machine's Python
#   TORCHAO=0.18.0        torchao pairs with one torch release (0.18 with torch 2.11): match the machine's
#   EXTRA="name==1.0 ..." more wheels, e.g. a newer huggingface_hub if the machine's is older than diffusers needs
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$(dirname "$here")/.venv/bin/python"
out="$here/.wheels"
mkdir -p "$out"
echo '*' > "$out/.gitignore"
packages=(diffusers importlib-metadata zipp fastapi starlette pydantic pydantic-core annotated-types annotated-doc
          typing-inspection typing-extensions opentelemetry-api uvicorn httptools python-multipart tomli-w)
specs=()
for name in "${packages[@]}"; do
  specs+=("$name==$("$venv" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
specs+=("torchao==${TORCHAO:-0.18.0}")
# shellcheck disable=SC2206
specs+=(${EXTRA:-})
"$venv" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$out" "${specs[@]}"
ls "$out"
