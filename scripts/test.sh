#!/usr/bin/env bash
# Fresh machine -> braid and its test extras installed -> the CPU test suite (GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
exec "${PYTHON:-python3}" -m pytest tests -q -p no:cacheprovider "$@"
