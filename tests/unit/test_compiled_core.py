"""The core compiled by mypyc (infra/build_core.py): in use after setup, equal to its sources in
every transition and state byte, and never used once a source differs from what was compiled."""

from __future__ import annotations

import importlib.machinery
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import udfs

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

# A generated day and a half of 40 users through the per-user step as the job drives it, printing a
# digest of every transition record and every state written.
RUN_CORE = """
import hashlib, json, sys
import udfs
from jobs.profile_stats import START_MS, drive
from jobs.settings import load_settings
from udfs.codec import SchemaCatalog
from udfs.profile_config import HOUR_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.state import ProfileStateCodec

settings = load_settings(None)
events = list(generate_events(40, 5, START_MS, 36 * HOUR_MS))
engine = Segmentation.load(settings.definitions_file(), settings.profile, settings.models_dir).engine()
codec = ProfileStateCodec(SchemaCatalog().codec("UserProfileState"))
digest, count = hashlib.sha256(), 0
original_step_event, original_step_timer = engine.step_event, engine.step_timer


def hashed(step):
    global count
    for t in step.transitions:
        digest.update(json.dumps(t.to_record(0), sort_keys=True).encode())
        count += 1
    digest.update(repr((step.outcome, step.register_timer_ms, step.drop_state)).encode())
    return step


class Recorder:
    def step_event(self, user_id, profile, event):
        return hashed(original_step_event(user_id, profile, event))

    def step_timer(self, user_id, profile, at_ms):
        return hashed(original_step_timer(user_id, profile, at_ms))


stored = {}
drive(Recorder(), events, codec, stored)
for user in sorted(stored):
    digest.update(user.encode() + stored[user])
print(udfs.CORE, count, digest.hexdigest())
"""


def run_core(env: dict[str, str], root: Path = ROOT) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", RUN_CORE],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return out.stdout.split()


def test_the_core_runs_compiled_after_setup():
    if os.environ.get(udfs.INTERPRETED_ENV) == "1":
        assert udfs.CORE == "interpreted"
        return
    assert udfs.CORE == "compiled", "the compiled core is missing or stale: run `bash infra/setup.sh`"
    for name in udfs.COMPILED_MODULES:
        assert __import__(f"udfs.{name}", fromlist=["_"]).__file__.endswith(SUFFIX), name


def test_compiled_and_interpreted_cores_give_the_same_transitions_and_state_bytes():
    compiled = run_core({udfs.INTERPRETED_ENV: "0"})
    interpreted = run_core({udfs.INTERPRETED_ENV: "1"})
    assert compiled[0] == "compiled" and interpreted[0] == "interpreted"
    assert int(compiled[1]) > 100  # the day has transitions to compare
    assert compiled[1:] == interpreted[1:]


def test_a_source_changed_after_the_build_runs_interpreted_with_a_warning(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "udfs", copy / "udfs")
    probe = (
        "import udfs, udfs.features as f; "
        "print(udfs.CORE, f.__file__.endswith('.py'), udfs.features.FeatureCatalog.__module__)"
    )

    def imported() -> tuple[list[str], str]:
        out = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=copy,
            env={**os.environ, "PYTHONPATH": str(copy), udfs.INTERPRETED_ENV: "0"},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return out.stdout.split(), out.stderr

    fresh, warned = imported()
    assert fresh == ["compiled", "False", "udfs.features"] and "RuntimeWarning" not in warned
    source = copy / "udfs" / "features.py"
    source.write_text(source.read_text() + "\n# changed after the build\n")
    stale, warned = imported()
    assert stale == ["interpreted", "True", "udfs.features"]
    assert "compiled core does not match its sources" in warned


def test_the_configuration_the_job_ships_survives_pickling():
    # The keyed function carries the profile configuration to the workers by (cloud)pickle; a
    # frozen dataclass compiled by mypyc refuses pickle's default restore.
    import cloudpickle

    from jobs.settings import load_settings
    from udfs.profile_config import Horizon, ProfileConfig

    config = ProfileConfig(
        horizons=(Horizon("2h", 2 * 3_600_000, 600_000), Horizon("1d", 86_400_000, 3_600_000)),
        session_gap_ms=20 * 60_000,
    )
    for value in (load_settings(None).profile, config, config.horizons[0]):
        for module in (pickle, cloudpickle):
            restored = module.loads(module.dumps(value))
            assert restored == value and type(restored) is type(value)
    assert isinstance(config.horizons[0], Horizon)
