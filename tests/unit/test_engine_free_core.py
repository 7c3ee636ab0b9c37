"""The core (udfs) must import without the engine or any client library: it runs in tests, the
backtest and the reference loop, none of which start Flink, Kafka or Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Every module of the package, found by walking it (a hand-written list missed five).
CORE_MODULES = tuple(sorted(f"udfs.{p.stem}" for p in (REPO / "udfs").glob("*.py") if p.stem != "__init__"))
FORBIDDEN = ("pyflink", "redis", "confluent_kafka")

# After each import, record which forbidden top-level packages are loaded, so a failure names
# the module that pulled one in.
PROBE = f"""
import importlib, json, sys
seen = {{}}
for name in {list(CORE_MODULES)!r}:
    importlib.import_module(name)
    seen[name] = sorted(m for m in {list(FORBIDDEN)!r} if m in sys.modules)
print(json.dumps(seen))
"""


def test_every_core_module_imports_without_pyflink_redis_or_confluent_kafka():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert list(seen) == list(CORE_MODULES)
    assert {"udfs.scoring", "udfs.segmentation", "udfs.features", "udfs.profile_config", "udfs.latency"} <= set(seen)
    assert seen == {name: [] for name in CORE_MODULES}
