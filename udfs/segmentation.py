"""What every runner of the core loads the same way (the job, the backtest, the benchmark, the
tests): the definitions file, checked against the installed models, and the verified models the
definitions read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from udfs import PACKAGE_DIR
from udfs.definitions import DefinitionSet, load_definitions, parse_definitions
from udfs.profile_config import ProfileConfig
from udfs.scoring import ModelRegistry, Scorer
from udfs.transitions import SegmentEngine

DEFAULT_MODELS_DIR = PACKAGE_DIR.parent / "models"


@dataclass
class Segmentation:
    """The definitions and the verified models they read, loaded the same way by every runner."""

    definitions: DefinitionSet
    registry: ModelRegistry | None  # None when the definitions read no model score

    @classmethod
    def load(
        cls,
        definitions_path: str | Path,
        profile_config: ProfileConfig | None = None,
        models_dir: str | Path | None = None,
    ) -> Segmentation:
        """The definitions file, with the models of `models_dir` (the shipped ones by default) verified."""
        models = Path(models_dir) if models_dir else DEFAULT_MODELS_DIR
        definitions = load_definitions(definitions_path, profile_config, ModelRegistry.outputs_of(models))
        return cls(definitions, cls._registry(definitions, models))

    @classmethod
    def from_text(
        cls, text: bytes, source: str, profile_config: ProfileConfig | None = None, models_dir: str | Path | None = None
    ) -> Segmentation:
        """As `load`, from the definitions' text; `source` names it in errors."""
        models = Path(models_dir) if models_dir else DEFAULT_MODELS_DIR
        definitions = parse_definitions(text, source, profile_config, ModelRegistry.outputs_of(models))
        return cls(definitions, cls._registry(definitions, models))

    @staticmethod
    def _registry(definitions: DefinitionSet, models: Path) -> ModelRegistry | None:
        if not definitions.models:
            return None
        return ModelRegistry.load(models, definitions.catalog, definitions.models, definitions.model_pins)

    def engine(self) -> SegmentEngine:
        """A fresh engine with its own scorer (and so its own scoring statistics)."""
        if self.registry is None:
            return SegmentEngine(self.definitions)
        return SegmentEngine(self.definitions, self.registry.version, Scorer(self.registry))
