"""Engine-free per-event core: decode, profile, features, segments, transitions.

Never imports pyflink, redis or confluent_kafka. The modules of COMPILED_MODULES run compiled by
mypyc when infra/build_core.py has built them from exactly the sources beside them (infra/setup.sh
does), and interpreted otherwise: a compiled module is never used once its source has changed.
"""

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

# The package's directory, for the files that live beside the code. Read here because this module
# is never compiled: in a module compiled by mypyc `__file__` names the compiled group, not the
# module's directory.
PACKAGE_DIR = Path(__file__).resolve().parent


def read_at_import(path: Path) -> bytes | OSError:
    """A data file's bytes, or the error that kept it unread, for a module to read when it is
    imported: in PyFlink's thread mode a worker's interpreter keeps the modules of the first job's
    python-dist directory, which Flink deletes when that job ends (see jobs/shipped_files.py), so a
    file read later could be gone. The error is raised where the bytes are needed."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e


# The per-event modules, compiled together (mypyc calls across them natively). Not compiled: codec
# (fastavro does its work), shoppers (the traffic generator), redis_layout, definition_warnings
# (`validate` alone), yaml_events (a subclass of PyYAML's Python classes, which mypyc cannot compile).
COMPILED_MODULES = (
    "conditions",
    "context",
    "definitions",
    "event_avro",
    "events",
    "experiments",
    "features",
    "latency",
    "profile",
    "profile_config",
    "scoring",
    "segmentation",
    "state",
    "transition_avro",
    "transitions",
)
# Written by infra/build_core.py: the digest of the sources it compiled (first line).
BUILD_STAMP = PACKAGE_DIR / "compiled-core.stamp"
INTERPRETED_ENV = "SEGMENTS_INTERPRETED_CORE"  # "1": run the sources even where a build is fresh


def sources_digest() -> str:
    """sha256 over the compiled modules' sources, as the build stamps it."""
    digest = hashlib.sha256()
    for name in COMPILED_MODULES:
        digest.update(name.encode() + b"\0" + (PACKAGE_DIR / f"{name}.py").read_bytes() + b"\0")
    return digest.hexdigest()


def _stamped_digest() -> str | None:
    try:
        return BUILD_STAMP.read_text().split("\n", 1)[0]
    except OSError:
        return None


def compiled_files() -> list[Path]:
    """The extension modules of COMPILED_MODULES present beside their sources."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return [p for name in COMPILED_MODULES if (p := PACKAGE_DIR / f"{name}{suffix}").is_file()]


class _Sources(importlib.abc.MetaPathFinder):
    """Imports the compiled modules from their sources, past the extension modules beside them
    (Python's own finder prefers an extension module to a source file of the same name)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, PACKAGE_DIR / f"{name}.py")


def _choose_core() -> str:
    present = compiled_files()
    if not present:
        return "interpreted"
    wanted = os.environ.get(INTERPRETED_ENV) != "1"
    if wanted and len(present) == len(COMPILED_MODULES) and _stamped_digest() == sources_digest():
        return "compiled"
    if wanted:
        warnings.warn(
            "udfs: the compiled core does not match its sources and is not used; run "
            "`bash infra/setup.sh` to compile it again",
            RuntimeWarning,
            stacklevel=2,
        )
    sys.meta_path.insert(0, _Sources())
    return "interpreted"


CORE = _choose_core()  # "compiled" or "interpreted": what this process runs
