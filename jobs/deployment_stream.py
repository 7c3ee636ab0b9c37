"""The job's side of live deployments that needs no Flink type (docs/deployments.md, "Job wiring"):
what the parallelism-1 validation operator does with each control record, and how a keyed
subtask holds the timeline it rebuilds from broadcast state. The Flink functions around them only
move their values."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from udfs.codec import DecodeError, SchemaCatalog
from udfs.deployments import (
    ACCEPTED,
    DeployedEngine,
    DeploymentError,
    Timeline,
    control_from_record,
    decision_from_text,
    decision_text,
    load_segmentation,
)
from udfs.profile_config import ProfileConfig
from udfs.segmentation import Segmentation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """What the validation operator makes of one control record: the decision for the broadcast
    (None: nothing to broadcast) and the status record for the status topic, or a dead letter's
    reason and message for a record that cannot be read."""

    decision: str | None
    status: bytes | None
    dead_letter: tuple[str, str] | None = None
    deployment_id: str | None = None  # the status record's key
    accepted: bool = False


class ControlValidator:
    """Validates each control record once, as at start-up, and decides it on its own timeline (the
    same decisions every keyed subtask then makes from the broadcast): run at parallelism 1, on
    the control topic's single partition, so every record is decided in one order."""

    def __init__(
        self,
        startup: Segmentation,
        catalog: SchemaCatalog,
        profile_config: ProfileConfig | None,
        models_dir: str | Path | None,
    ):
        self.controls = catalog.codec("Deployment")
        self.statuses = catalog.codec("DeploymentStatus")
        self.profile_config, self.models_dir = profile_config, models_dir
        self.timeline = Timeline(startup, self._load)

    def _load(self, control):
        return load_segmentation(control, self.profile_config, self.models_dir)

    def verdict(self, payload: bytes, record_timestamp_ms: int, now_ms: int) -> Verdict:
        """The verdict on one control topic record; never raises for what the record holds."""
        try:
            control = control_from_record(self.controls.decode(payload), record_timestamp_ms)
        except DecodeError as err:
            return Verdict(None, None, (err.reason, err.message))
        except DeploymentError as err:
            return Verdict(None, None, ("invalid_deployment", str(err)))
        status, refusal = self.timeline.admit(control)
        log.info("deployment %s (%s): %s", control.deployment_id, control.action, status.status)
        return Verdict(
            decision_text(control, refusal),
            self.statuses.encode(status.to_record(now_ms)),
            None,
            control.deployment_id,
            status.status == ACCEPTED,
        )

    def restore(self, decisions: Iterable[str]) -> None:
        """The decisions made before a restart (the operator's state), decided again in order."""
        for text in decisions:
            self.timeline.decide(*decision_from_text(text))


class BroadcastTimeline:
    """A keyed subtask's timeline and engine, rebuilt from the broadcast state's decisions (by
    their order) the first time an element needs them, and kept up to date as decisions arrive."""

    def __init__(
        self,
        startup: Segmentation,
        profile_config: ProfileConfig | None,
        models_dir: str | Path | None,
        sweep_ms: int,
        consent_default: bool,
    ):
        def load(control):
            return load_segmentation(control, profile_config, models_dir)

        self._startup, self._load, self._sweep_ms, self._consent = startup, load, sweep_ms, consent_default
        self.engine: DeployedEngine | None = None

    def rebuild(self, decisions: Iterable[tuple[int, str]]) -> DeployedEngine:
        """The engine of the timeline made of `decisions` ((order, decision text): what the
        broadcast state holds), decided in their order."""
        timeline = Timeline(self._startup, self._load)
        for _, text in sorted(decisions):
            control, refusal = decision_from_text(text)
            timeline.decide(control, refusal)
        self.engine = DeployedEngine(timeline, self._sweep_ms)
        self.engine.consent_default = self._consent
        return self.engine

    def add(self, text: str) -> None:
        """A decision that has just arrived (after the rebuild: it is in the broadcast state too)."""
        if self.engine is not None:
            control, refusal = decision_from_text(text)
            self.engine.timeline.decide(control, refusal)
