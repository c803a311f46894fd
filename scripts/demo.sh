#!/usr/bin/env bash
# Fresh machine -> braid installed -> the quickstart on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" examples/quickstart.py
