#!/usr/bin/env bash
# The test command: sets up what the tests need (infra/setup.sh), then runs the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/infra/setup.sh"
cd "$ROOT"
exec "${SEGMENTS_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
