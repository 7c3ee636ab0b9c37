#!/usr/bin/env bash
# The benchmark command: sets up what it needs (infra/setup.sh), then `segments bench` with the
# given flags (e.g. --events 20000 --checkpoint-users 10000 --latency-seconds 15 for a quick run).
# It starts its own broker and Redis on free ports and stops them, and every job it starts, at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/infra/setup.sh"
cd "$ROOT"
exec "${SEGMENTS_VENV:-$ROOT/.venv}/bin/python" -m jobs.cli bench "$@"
