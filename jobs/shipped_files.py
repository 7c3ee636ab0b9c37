"""The data files the job's workers read (schemas, models), shipped inside the function objects
rather than read from the shipped code: see ShippedFiles."""

from __future__ import annotations

from pathlib import Path

from udfs.codec import SCHEMAS_DIR
from udfs.segmentation import DEFAULT_MODELS_DIR


class ShippedFiles:
    """Data files the workers read (schemas, models), carried inside the function objects and
    written to a private directory in open(). Why not read them from the shipped code: in thread
    mode (PEMJA) a TaskManager's Python interpreter outlives a job, keeps the modules it imported
    from the first job's python-dist directory, and Flink deletes that directory when the job ends,
    so a job resumed or rescaled onto the same TaskManager would find none of its files."""

    def __init__(self, directories: dict[str, Path]):
        self.files = {
            f"{name}/{path.relative_to(root)}": path.read_bytes()
            for name, root in directories.items()
            for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".py"
        }

    @classmethod
    def of_job(cls, models_dir: str | None, models: tuple[str, ...]) -> ShippedFiles:
        """The schemas and the `models` (those the definitions read) from `models_dir` (the
        settings' models_dir, or the project's models/)."""
        root = Path(models_dir) if models_dir else DEFAULT_MODELS_DIR
        return cls({"schemas": SCHEMAS_DIR, **{f"models/{m}": root / m for m in models}})

    def materialize(self) -> Path:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="segments-files-"))
        for name, data in self.files.items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return root
