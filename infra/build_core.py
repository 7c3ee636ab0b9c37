"""Compiles the engine-free core's per-event modules (udfs.COMPILED_MODULES) to C extension
modules with mypyc, in place beside their sources, and stamps the sources' digest so that udfs
uses them only while the sources are unchanged. Does nothing when the build is fresh.

    .venv/bin/python infra/build_core.py [--force]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(force: bool = False) -> bool:
    """Builds unless the compiled modules match the sources and this mypyc; True if it built."""
    os.environ["SEGMENTS_INTERPRETED_CORE"] = "1"  # digest the sources without importing the build
    sys.path.insert(0, str(ROOT))
    import mypy.version
    from mypyc.build import mypycify
    from setuptools import setup

    import udfs

    stamp = f"{udfs.sources_digest()}\nmypy {mypy.version.__version__}, {sys.implementation.cache_tag}\n"
    fresh = len(udfs.compiled_files()) == len(udfs.COMPILED_MODULES) and udfs.BUILD_STAMP.is_file()
    if fresh and udfs.BUILD_STAMP.read_text() == stamp and not force:
        return False
    os.chdir(ROOT)  # mypyc names the modules by their paths from here
    with tempfile.TemporaryDirectory(prefix="segments-core-build-") as work:
        setup(
            name="segments-core",
            ext_modules=mypycify(
                [f"udfs/{name}.py" for name in udfs.COMPILED_MODULES],
                opt_level="3",
                group_name="udfs.compiled",  # the shared library lands in udfs/, not the top level
                target_dir=os.path.join(work, "c"),
            ),
            script_args=[
                "-q",
                "build_ext",
                "--inplace",
                "--build-temp",
                os.path.join(work, "o"),
                "--build-lib",
                os.path.join(work, "lib"),
            ],
        )
    udfs.BUILD_STAMP.write_text(stamp)
    return True


if __name__ == "__main__":
    built = build(force="--force" in sys.argv[1:])
    print("compiled the core" if built else "the compiled core is up to date", file=sys.stderr)
