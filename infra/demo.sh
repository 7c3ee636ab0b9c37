#!/usr/bin/env bash
# The run command: sets everything up, starts the local stack, runs the job on the embedded
# MiniCluster with generated traffic, and prints transitions as they are committed. Ctrl-C stops.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/infra/setup.sh"
cd "$ROOT"
exec "${SEGMENTS_VENV:-$ROOT/.venv}/bin/segments" demo "$@"
