"""Live deployments (docs/deployments.md): control records that deploy a definitions file (and
models) active or in shadow, promote the candidate in shadow or roll back, each from an
event-time instant; the timeline of the ones accepted; and the per-user step that switches a
profile from one version to the next at each instant on the way, so that transitions are a
function of the events and the deployments, not of when a user happens to be visited.

Engine-free like the rest of udfs/: the job feeds it control records from broadcast state, the
backtest from a file, and both step users through `DeployedEngine` the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import tempfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from udfs.definitions import DefinitionError
from udfs.events import UserEvent
from udfs.identity import Identify
from udfs.privacy import SCORING, PrivacyState, UserRequest
from udfs.profile import ShadowState, UserProfile
from udfs.profile_config import ProfileConfig
from udfs.scoring import MANIFEST, ModelVerificationError
from udfs.segmentation import DEFAULT_MODELS_DIR, Segmentation
from udfs.transitions import DEPLOYMENT, FoldOut, SegmentEngine, Step, Transition

DEPLOY, PROMOTE, ROLLBACK = "DEPLOY", "PROMOTE", "ROLLBACK"
ACTIVE, SHADOW = "ACTIVE", "SHADOW"
ACCEPTED, REFUSED = "ACCEPTED", "REFUSED"
STARTUP = ""  # the version the job started with (its definitions file and models directory)
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class DeploymentError(ValueError):
    """A control record that cannot be read (a malformed record, not a refused deployment)."""


@dataclass(frozen=True)
class ModelBundle:
    """One model of a deployment: its manifest, and its ONNX bytes inline or by a reference
    (a path every worker can read) with the sha256 the bytes read must have."""

    name: str
    manifest: str
    onnx: bytes | None = None
    onnx_reference: str | None = None
    onnx_sha256: str | None = None


@dataclass(frozen=True)
class ControlRecord:
    """A record of the control topic (schemas/deployment.avsc), its instant resolved."""

    deployment_id: str
    action: str  # DEPLOY | PROMOTE | ROLLBACK
    effective_at: int  # event-time ms
    mode: str | None = None  # DEPLOY: ACTIVE | SHADOW
    definitions: bytes | None = None
    definitions_version: str | None = None
    models: tuple[ModelBundle, ...] = ()
    requested_at: int = 0
    source: str = ""

    def to_record(self) -> dict:
        """The Avro record of `deployment.avsc`."""
        return {
            "deployment_id": self.deployment_id,
            "action": self.action,
            "mode": self.mode,
            "definitions": self.definitions,
            "definitions_version": self.definitions_version,
            "models": [
                {
                    "name": m.name,
                    "manifest": m.manifest,
                    "onnx": m.onnx,
                    "onnx_reference": m.onnx_reference,
                    "onnx_sha256": m.onnx_sha256,
                }
                for m in self.models
            ],
            "effective_at": self.effective_at,
            "requested_at": self.requested_at,
            "source": self.source,
        }

    def to_json(self) -> dict:
        """As `to_record`, with the bytes as text (the definitions) and base64 (the models): a
        line of a deployments file (`segments backtest --deployments`)."""
        record = self.to_record()
        record["definitions"] = None if self.definitions is None else self.definitions.decode()
        for model in record["models"]:
            model["onnx"] = None if model["onnx"] is None else base64.b64encode(model["onnx"]).decode()
        return record


def control_from_record(record: dict, record_timestamp_ms: int | None = None) -> ControlRecord:
    """A decoded control record; without `effective_at` it applies from the Kafka record's
    timestamp (`record_timestamp_ms`), which every subtask sees the same."""
    effective_at = record.get("effective_at")
    if effective_at is None:
        effective_at = record_timestamp_ms
    if effective_at is None:
        raise DeploymentError("a control record with no effective_at and no record timestamp")
    action, mode = record.get("action"), record.get("mode")
    deployment_id = record.get("deployment_id")
    if not isinstance(deployment_id, str) or not deployment_id:
        raise DeploymentError("a control record needs a deployment_id")
    if action not in (DEPLOY, PROMOTE, ROLLBACK):
        raise DeploymentError(f"unknown action {action!r}")
    if action == DEPLOY and (mode not in (ACTIVE, SHADOW) or record.get("definitions") is None):
        raise DeploymentError("a DEPLOY needs a mode (ACTIVE or SHADOW) and the definitions")
    return ControlRecord(
        deployment_id=deployment_id,
        action=action,
        effective_at=int(effective_at),
        mode=mode if action == DEPLOY else None,
        definitions=record.get("definitions"),
        definitions_version=record.get("definitions_version"),
        models=tuple(
            ModelBundle(m["name"], m["manifest"], m.get("onnx"), m.get("onnx_reference"), m.get("onnx_sha256"))
            for m in record.get("models") or ()
        ),
        requested_at=int(record.get("requested_at") or 0),
        source=str(record.get("source") or ""),
    )


def control_from_json(line: dict) -> ControlRecord:
    """A line of a deployments file (`ControlRecord.to_json`)."""
    if not isinstance(line, dict):
        raise DeploymentError("a deployments file holds one JSON object a line")
    record = dict(line)
    if isinstance(record.get("definitions"), str):
        record["definitions"] = record["definitions"].encode()
    models = []
    for model in record.get("models") or ():
        model = dict(model)
        if isinstance(model.get("onnx"), str):
            try:
                model["onnx"] = base64.b64decode(model["onnx"], validate=True)
            except binascii.Error as err:
                raise DeploymentError(f"model {model.get('name')!r}: onnx is not base64 ({err})") from None
        models.append(model)
    record["models"] = models
    return control_from_record(record)


def read_deployments_file(path: str | Path) -> list[ControlRecord]:
    """The control records of a deployments file: one JSON object a line (what `segments deploy
    --output FILE` writes instead of sending)."""
    controls = []
    for number, text in enumerate(Path(path).read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            controls.append(control_from_json(json.loads(text)))
        except (json.JSONDecodeError, DeploymentError, KeyError, TypeError) as err:
            raise DeploymentError(f"{path}:{number}: {err}") from None
    return controls


def deploy_control(
    deployment_id: str,
    definitions_path: str | Path,
    effective_at: int,
    shadow: bool = False,
    models_dir: str | Path | None = None,
    requested_at: int = 0,
    source: str = "segments deploy",
) -> ControlRecord:
    """The DEPLOY record of a definitions file, with the models of `models_dir` inline."""
    text = Path(definitions_path).read_bytes()
    version = _declared_version(text)
    bundles = []
    if models_dir is not None:
        for manifest_path in sorted(Path(models_dir).glob(f"*/{MANIFEST}")):
            manifest = manifest_path.read_text()
            onnx_file = json.loads(manifest).get("onnx_file", "")
            bundles.append(
                ModelBundle(manifest_path.parent.name, manifest, (manifest_path.parent / onnx_file).read_bytes())
            )
    return ControlRecord(
        deployment_id,
        DEPLOY,
        effective_at,
        SHADOW if shadow else ACTIVE,
        text,
        version,
        tuple(bundles),
        requested_at,
        source,
    )


def _declared_version(text: bytes) -> str | None:
    """The `version:` line of a definitions file, read as text (the validation parses it)."""
    match = re.search(rb"^version:\s*['\"]?([^'\"\s#]+)", text, re.MULTILINE)
    return match.group(1).decode(errors="replace") if match else None


def decision_text(control: ControlRecord, refusal: str | None) -> str:
    """A control record and its validation's verdict as one text value (the job's broadcast state
    holds these, by the order they were decided in)."""
    return json.dumps({"control": control.to_json(), "refusal": refusal}, sort_keys=True)


def decision_from_text(text: str) -> tuple[ControlRecord, str | None]:
    """What `decision_text` made."""
    value = json.loads(text)
    return control_from_json(value["control"]), value["refusal"]


# -- validation: what start-up checks, on the deployment's definitions and models ---------------------


def load_segmentation(
    control: ControlRecord, profile_config: ProfileConfig | None = None, models_dir: str | Path | None = None
) -> Segmentation:
    """The deployment's definitions with its models (overlaid on `models_dir`, the job's), checked
    and verified as at start-up: the definitions compile, the models' manifests, hashes and
    golden sets verify, the features they read exist. Raises DeploymentError with the reason."""
    base = Path(models_dir) if models_dir else DEFAULT_MODELS_DIR
    try:
        with tempfile.TemporaryDirectory(prefix="segments-deployment-") as work:
            directory = _materialize(control.models, base, Path(work)) if control.models else base
            segmentation = Segmentation.from_text(
                control.definitions or b"", f"deployment {control.deployment_id}", profile_config, directory
            )
    except (DefinitionError, ModelVerificationError, OSError, ValueError, KeyError, TypeError) as err:
        raise DeploymentError(str(err)) from None
    declared = control.definitions_version
    if declared is not None and declared != segmentation.definitions.version:
        raise DeploymentError(
            f"the record says version {declared!r}, the definitions declare {segmentation.definitions.version!r}"
        )
    return segmentation


def validate(
    control: ControlRecord, profile_config: ProfileConfig | None = None, models_dir: str | Path | None = None
) -> str | None:
    """Why the deployment is refused, or None when it validates (PROMOTE and ROLLBACK carry nothing
    to validate; the timeline decides whether they apply)."""
    if control.action != DEPLOY:
        return None
    try:
        load_segmentation(control, profile_config, models_dir)
    except DeploymentError as err:
        return str(err)
    return None


def _materialize(bundles: Iterable[ModelBundle], base: Path, work: Path) -> Path:
    """A models directory: the job's models, with the bundles' written over them."""
    bundled = {}
    for bundle in bundles:
        if not _MODEL_NAME.fullmatch(bundle.name) or bundle.name in (".", ".."):
            raise DeploymentError(f"model name {bundle.name!r} is not a plain name")
        onnx_file = json.loads(bundle.manifest).get("onnx_file")
        if not isinstance(onnx_file, str) or not _MODEL_NAME.fullmatch(onnx_file) or onnx_file in (".", ".."):
            raise DeploymentError(f"model {bundle.name}: onnx_file {onnx_file!r} is not a plain file name")
        bundled[bundle.name] = (bundle, onnx_file)
    if base.is_dir():
        for directory in sorted(p.parent for p in base.glob(f"*/{MANIFEST}")):
            if directory.name not in bundled:
                (work / directory.name).symlink_to(directory.resolve(), target_is_directory=True)
    for name, (bundle, onnx_file) in bundled.items():
        onnx = bundle.onnx
        if onnx is None:
            if not bundle.onnx_reference or not bundle.onnx_sha256:
                raise DeploymentError(f"model {name}: neither inline ONNX bytes nor a reference with its sha256")
            onnx = Path(bundle.onnx_reference).read_bytes()
            if hashlib.sha256(onnx).hexdigest() != bundle.onnx_sha256.lower():
                raise DeploymentError(
                    f"model {name}: {bundle.onnx_reference} does not have the sha256 the record gives"
                )
        (work / name).mkdir()
        (work / name / MANIFEST).write_text(bundle.manifest)
        (work / name / onnx_file).write_bytes(onnx)
    return work


# -- the timeline --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """An accepted control record, and the versions in force from its instant."""

    deployment_id: str
    action: str
    instant_ms: int
    active: str  # the version (its DEPLOY's id; STARTUP) active from the instant
    shadow: str | None  # the candidate in shadow from the instant
    earlier_actives: tuple[str, ...]  # what ROLLBACK returns to, latest last


@dataclass(frozen=True)
class DeploymentStatus:
    """What was made of one control record (schemas/deployment_status.avsc)."""

    deployment_id: str
    action: str
    status: str  # ACCEPTED | REFUSED
    effective_at: int
    mode: str | None = None
    reason: str | None = None
    active_version: str | None = None
    shadow_version: str | None = None

    def to_record(self, decided_at: int) -> dict:
        """The Avro record of `deployment_status.avsc`."""
        return {
            "deployment_id": self.deployment_id,
            "action": self.action,
            "status": self.status,
            "mode": self.mode,
            "reason": self.reason,
            "effective_at": self.effective_at,
            "active_version": self.active_version,
            "shadow_version": self.shadow_version,
            "decided_at": decided_at,
        }


def version_label(segmentation: Segmentation) -> str:
    """`definitions@models` (the definitions' version alone when they read no model)."""
    models = segmentation.registry.version if segmentation.registry is not None else None
    return segmentation.definitions.version + (f"@{models}" if models else "")


class Timeline:
    """The deployments accepted so far, in the order of their instants, and the versions in force
    at any instant. Every keyed subtask builds the same one from the same control records and
    verdicts; versions are loaded from their records when first used (`loader`)."""

    def __init__(self, startup: Segmentation, loader: Callable[[ControlRecord], Segmentation]):
        self._loader = loader
        self._segmentations: dict[str, Segmentation] = {STARTUP: startup}
        self._controls: dict[str, ControlRecord] = {}
        self.entries: list[Entry] = []
        self._positions: dict[str, int] = {}
        self.decided: dict[str, DeploymentStatus] = {}

    def segmentation(self, version: str) -> Segmentation:
        """A version's definitions and models (loaded the first time)."""
        found = self._segmentations.get(version)
        if found is None:
            found = self._segmentations[version] = self._loader(self._controls[version])
        return found

    def label(self, version: str | None) -> str | None:
        """A version's `version_label` (None for no version)."""
        return None if version is None else version_label(self.segmentation(version))

    def decide(
        self, control: ControlRecord, refusal: str | None = None, segmentation: Segmentation | None = None
    ) -> DeploymentStatus:
        """Adds the record to the timeline unless `refusal` (its validation's verdict) or the
        timeline refuses it; the status either way. A record seen before gets its first status.
        `segmentation`: the version the validation loaded, kept (else loaded when first used)."""
        seen = self.decided.get(control.deployment_id)
        if seen is not None:
            return seen
        active, shadow, earlier = self._latest()
        if refusal is None and self.entries and control.effective_at < self.entries[-1].instant_ms:
            refusal = (
                f"effective_at {control.effective_at} is before the latest deployment's instant "
                f"{self.entries[-1].instant_ms}: deployments apply in the order of their instants"
            )
        if refusal is None:
            if control.action == DEPLOY and control.mode == ACTIVE:
                active, earlier = control.deployment_id, (*earlier, active)
            elif control.action == DEPLOY:
                shadow = control.deployment_id
            elif control.action == PROMOTE:
                if shadow is None:
                    refusal = "no candidate in shadow to promote"
                else:
                    active, shadow, earlier = shadow, None, (*earlier, active)
            elif not earlier:
                refusal = "no earlier version to roll back to"
            else:
                active, earlier = earlier[-1], earlier[:-1]
        if refusal is None:
            if control.action == DEPLOY:
                self._controls[control.deployment_id] = control
                if segmentation is not None:
                    self._segmentations[control.deployment_id] = segmentation
            self._positions[control.deployment_id] = len(self.entries)
            self.entries.append(
                Entry(control.deployment_id, control.action, control.effective_at, active, shadow, earlier)
            )
            status = DeploymentStatus(
                control.deployment_id,
                control.action,
                ACCEPTED,
                control.effective_at,
                control.mode,
                None,
                self.label(active),
                self.label(shadow),
            )
        else:
            status = DeploymentStatus(
                control.deployment_id, control.action, REFUSED, control.effective_at, control.mode, refusal
            )
        self.decided[control.deployment_id] = status
        return status

    def admit(self, control: ControlRecord) -> tuple[DeploymentStatus, str | None]:
        """Validates the record (a DEPLOY's version loaded as at start-up) and decides it: its
        status, and its validation's refusal (None: it validated) for those deciding it after."""
        refusal, loaded = None, None
        if control.action == DEPLOY and control.deployment_id not in self.decided:
            try:
                loaded = self._loader(control)
            except DeploymentError as err:
                refusal = str(err)
        return self.decide(control, refusal, loaded), refusal

    def _latest(self) -> tuple[str, str | None, tuple[str, ...]]:
        if not self.entries:
            return STARTUP, None, ()
        last = self.entries[-1]
        return last.active, last.shadow, last.earlier_actives

    def position(self, profile: UserProfile) -> int:
        """The index of the latest entry applied to the profile (-1: none, the start-up version).
        An id the timeline does not know (state from a job with another control topic) counts as
        every entry up to the profile's clock applied."""
        if profile.deployment is None:
            return -1
        found = self._positions.get(profile.deployment)
        if found is not None:
            return found
        return sum(1 for e in self.entries if e.instant_ms <= profile.clock_ms) - 1

    def active_at(self, position: int) -> str:
        """The version active after the entry at `position` (-1: before every entry)."""
        return STARTUP if position < 0 else self.entries[position].active

    def next_instant(self, position: int) -> int | None:
        """The instant of the first entry after `position` (None: no later one)."""
        return self.entries[position + 1].instant_ms if position + 1 < len(self.entries) else None


def timeline_of(
    startup: Segmentation,
    controls: Iterable[ControlRecord],
    profile_config: ProfileConfig | None = None,
    models_dir: str | Path | None = None,
) -> Timeline:
    """The timeline the job builds from these control records, in this order: each validated
    against `models_dir` (the job's models) and decided; `decided` holds every status."""

    def load(control: ControlRecord) -> Segmentation:
        return load_segmentation(control, profile_config, models_dir)

    timeline = Timeline(startup, load)
    for control in controls:
        timeline.admit(control)
    return timeline


# -- the per-user step ---------------------------------------------------------------------------------


def sweep_instant(user_id: str, after_ms: int, sweep_ms: int) -> int:
    """The user's next sweep instant after `after_ms`: the user's phase (a hash of the id, the same
    in every process) plus a multiple of `sweep_ms`, so sweeps spread uniformly over the interval."""
    phase = zlib.crc32(user_id.encode()) % sweep_ms
    return after_ms - (after_ms - phase) % sweep_ms + sweep_ms


@dataclass
class _Shadowing:
    """The candidate in shadow on one profile: its engine and its state."""

    engine: SegmentEngine
    state: ShadowState


@dataclass
class _Progress:
    """What bringing a profile through the timeline left for the step: the version then active,
    the latest entry applied, the switches' transitions and the shadows' (ended or started)."""

    engine: SegmentEngine
    deployment: str | None
    switched: list[Transition] = field(default_factory=list)
    shadow_transitions: list[Transition] = field(default_factory=list)
    shadowing: _Shadowing | None = None


class DeployedEngine:
    """The per-user steps of `SegmentEngine` (same names, same arguments), with the timeline's
    deployments applied on the way: a step at `t` first brings the profile through every entry
    with an instant up to `t` not applied to it yet, each at its instant (the previous version
    advances to it; then the next one decides every unit), then the version active at `t` takes
    the step; a candidate in shadow is stepped on the same profile beside it. With `sweep_ms`, a
    user with state keeps a timer at most that long after their latest step, at a phase of their
    own, so that a deployment reaches quiet users too, spread over the interval."""

    def __init__(self, timeline: Timeline, sweep_ms: int = 0):
        self.timeline = timeline
        self.sweep_ms = sweep_ms
        self._engines: dict[str, SegmentEngine] = {}
        self._consent_default = True
        self.config = timeline.segmentation(STARTUP).definitions.catalog.config

    @property
    def consent_default(self) -> bool:
        """Whether a user with no consent record has consented (SegmentEngine.consent_default)."""
        return self._consent_default

    @consent_default.setter
    def consent_default(self, value: bool) -> None:
        self._consent_default = value
        for engine in self._engines.values():
            engine.consent_default = value

    @property
    def definitions_version(self) -> str:
        """The definitions version active after the latest deployment (an erasure's audit)."""
        return self.engine(self.timeline.active_at(len(self.timeline.entries) - 1)).definitions_version

    def engine(self, version: str) -> SegmentEngine:
        """The engine of a version (built the first time; kept, with its scorer, after)."""
        engine = self._engines.get(version)
        if engine is None:
            engine = self._engines[version] = self.timeline.segmentation(version).engine()
            engine.consent_default = self._consent_default
        return engine

    def current(self, profile: UserProfile) -> SegmentEngine:
        """The engine of the version last applied to the profile."""
        return self.engine(self.timeline.active_at(self.timeline.position(profile)))

    def is_duplicate(self, profile: UserProfile, event: UserEvent) -> bool:
        """`SegmentEngine.is_duplicate`."""
        return self.current(profile).is_duplicate(profile, event)

    def step_event(
        self,
        user_id: str,
        profile: UserProfile,
        event: UserEvent,
        late_before_ms: int | None = None,
        privacy: PrivacyState | None = None,
    ) -> Step:
        """`SegmentEngine.step_event` after the deployments due by the event's time. An event
        that is not applied (late, refused for privacy, a duplicate) changes nothing."""
        ts = event.timestamp
        current = self.current(profile)
        if (
            (late_before_ms is not None and ts < late_before_ms)
            or current._privacy_verdict(privacy, ts)[0] is not None
            or current.is_duplicate(profile, event)
        ):
            return current.step_event(user_id, profile, event, late_before_ms, privacy)
        scoring = self._scoring(privacy)
        progress = self._catch_up(user_id, profile, ts, scoring)
        self._shadow_advance(user_id, profile, progress, ts, True, scoring)
        step = progress.engine.step_event(user_id, profile, event, late_before_ms, privacy)
        shadowing = progress.shadowing
        if shadowing is not None and not profile.is_empty:
            view = self._view(profile, shadowing.state)
            progress.shadow_transitions += shadowing.engine.shadow_evaluate(
                user_id, view, "EVENT", event.event_id, scoring
            )
            self._keep(view, shadowing.state)
        return self._finish(user_id, profile, step, progress)

    def step_timer(self, user_id: str, profile: UserProfile, time_ms: int, privacy: PrivacyState | None = None) -> Step:
        """`SegmentEngine.step_timer` after the deployments due by `time_ms`."""
        scoring = self._scoring(privacy)
        progress = self._catch_up(user_id, profile, time_ms, scoring)
        self._shadow_advance(user_id, profile, progress, time_ms, False, scoring)
        step = progress.engine.step_timer(user_id, profile, time_ms, privacy)
        return self._finish(user_id, profile, step, progress)

    def step_request(
        self, user_id: str, profile: UserProfile, privacy: PrivacyState, request: UserRequest, tombstone_ms: int
    ) -> Step:
        """`SegmentEngine.step_request` after the deployments due by the request's time. A request
        that empties the profile ends the shadow too (its memberships go with the profile)."""
        scoring = self._scoring(privacy)
        progress = self._catch_up(user_id, profile, request.timestamp, scoring)
        self._shadow_advance(user_id, profile, progress, request.timestamp, True, scoring)
        step = progress.engine.step_request(user_id, profile, privacy, request, tombstone_ms)
        return self._finish(user_id, profile, step, progress)

    def step_fold_out(
        self, user_id: str, profile: UserProfile, identify: Identify, late_before_ms: int | None = None
    ) -> FoldOut:
        """`SegmentEngine.step_fold_out` after the deployments due by the identify's time (the
        anonymous id's shadow ends with its profile)."""
        if late_before_ms is not None and identify.timestamp < late_before_ms:
            return self.current(profile).step_fold_out(user_id, profile, identify, late_before_ms)
        progress = self._catch_up(user_id, profile, identify.timestamp, True)
        fold = progress.engine.step_fold_out(user_id, profile, identify, late_before_ms)
        if fold.folded is not None:
            fold.folded.shadow = None
        return FoldOut(self._finish(user_id, profile, fold.step, progress), fold.folded)

    def step_fold_in(
        self,
        user_id: str,
        profile: UserProfile,
        folded: UserProfile,
        cause_event_id: str,
        privacy: PrivacyState | None = None,
        folded_from: str | None = None,
    ) -> Step:
        """`SegmentEngine.step_fold_in` after the deployments due by the fold's time (the shadow
        decides the merged profile at its next step)."""
        progress = self._catch_up(user_id, profile, folded.clock_ms, self._scoring(privacy))
        step = progress.engine.step_fold_in(user_id, profile, folded, cause_event_id, privacy, folded_from)
        return self._finish(user_id, profile, step, progress)

    def _scoring(self, privacy: PrivacyState | None) -> bool:
        return self._consent_default if privacy is None else privacy.allows(SCORING, self._consent_default)

    def _catch_up(self, user_id: str, profile: UserProfile, time_ms: int, scoring: bool) -> _Progress:
        """Applies to the profile every entry up to `time_ms` it has not seen, each at its instant
        (or at the profile's clock when that is already past, for an entry that reached the job
        late): the previous version's time-driven changes before the instant, then the next
        version deciding every unit (cause DEPLOYMENT); a candidate in shadow ends or starts."""
        timeline = self.timeline
        position = timeline.position(profile)
        last = position
        while last + 1 < len(timeline.entries) and timeline.entries[last + 1].instant_ms <= time_ms:
            last += 1
        shadow = profile.shadow
        progress = _Progress(
            self.engine(timeline.active_at(last)),
            profile.deployment if last == position else timeline.entries[last].deployment_id,
            shadowing=None if shadow is None else _Shadowing(self.engine(shadow.deployment), shadow),
        )
        if last == position:
            return progress
        if profile.last_event_ms is None:  # nothing to decide: the profile is simply of the latest
            shadow_version = timeline.entries[last].shadow
            progress.shadowing = None
            if shadow_version is not None:  # a candidate with no membership yet
                state = ShadowState(shadow_version, timeline.entries[last].instant_ms)
                progress.shadowing = _Shadowing(self.engine(shadow_version), state)
            profile.deployment = progress.deployment
            profile.shadow = None if progress.shadowing is None else progress.shadowing.state
            return progress
        for index in range(position + 1, last + 1):
            entry = timeline.entries[index]
            previous = timeline.active_at(index - 1)
            shadowing = progress.shadowing
            if shadowing is not None and entry.shadow != shadowing.state.deployment:
                # The candidate ends here (replaced, promoted or withdrawn): its changes up to now.
                self._shadow_advance(user_id, profile, progress, entry.instant_ms, True, scoring)
                progress.shadowing = None
            if entry.active != previous:
                progress.switched += self.engine(entry.active).take_over(
                    self.engine(previous), user_id, profile, entry.instant_ms, entry.deployment_id, scoring
                )
            if entry.shadow is not None and progress.shadowing is None and not profile.is_empty:
                self._start_shadow(user_id, profile, entry, progress, scoring)
            profile.deployment = entry.deployment_id
        profile.shadow = None if progress.shadowing is None else progress.shadowing.state
        profile.body_changed()
        return progress

    def _start_shadow(
        self, user_id: str, profile: UserProfile, entry: Entry, progress: _Progress, scoring: bool
    ) -> None:
        """The candidate starts on the profile at the entry's instant: every unit decided (cause
        DEPLOYMENT), from no membership; on a profile that has lapsed by then it starts empty."""
        assert entry.shadow is not None
        engine = self.engine(entry.shadow)
        start = max(entry.instant_ms, profile.clock_ms)
        progress.shadowing = _Shadowing(engine, ShadowState(entry.shadow, start))
        expiry = engine.retention_expiry_ms(profile)
        if expiry is None or expiry > start:
            view = self._view(profile, progress.shadowing.state)
            progress.shadow_transitions += engine.shadow_evaluate(
                user_id, view, DEPLOYMENT, entry.deployment_id, scoring
            )
            self._keep(view, progress.shadowing.state)

    def _shadow_advance(
        self, user_id: str, profile: UserProfile, progress: _Progress, time_ms: int, before: bool, scoring: bool
    ) -> None:
        """The candidate's time-driven changes up to `time_ms` (strictly before it with `before`)."""
        shadowing = progress.shadowing
        if shadowing is None:
            return
        view = self._view(profile, shadowing.state)
        progress.shadow_transitions += shadowing.engine.shadow_advance(user_id, view, time_ms, before, scoring)
        self._keep(view, shadowing.state)

    @staticmethod
    def _view(profile: UserProfile, state: ShadowState) -> UserProfile:
        """The profile as the candidate sees it: the same events, its own memberships, scores and
        clock. A shallow copy: the engine's steps replace these fields, never change the events'."""
        view = UserProfile()
        for f in fields(UserProfile):
            setattr(view, f.name, getattr(profile, f.name))
        view.memberships, view.scores, view.scored_at_ms = state.memberships, state.scores, state.scored_at_ms
        view.clock_ms = state.clock_ms
        view.derived, view.next_change_memo, view.timer_ms, view.shadow = {}, None, None, None
        return view

    @staticmethod
    def _keep(view: UserProfile, state: ShadowState) -> None:
        state.memberships, state.scores, state.scored_at_ms = view.memberships, view.scores, view.scored_at_ms
        state.clock_ms = view.clock_ms

    def _finish(self, user_id: str, profile: UserProfile, step: Step, progress: _Progress) -> Step:
        """The step with the switches' transitions first and the shadow's beside them; the
        deployment and the shadow written back (an expiry within the step empties a profile's
        fields, and the step's event may start a new lifetime); the timer moved earlier for the
        shadow's next change, the next deployment known or the user's sweep."""
        if progress.switched:
            step.transitions[:0] = progress.switched
        step.shadow_transitions += progress.shadow_transitions
        if step.drop_state or profile.is_empty:
            profile.shadow = None
            return step
        if profile.deployment != progress.deployment:
            profile.deployment = progress.deployment
            profile.body_changed()
        earliest = self.timeline.next_instant(self.timeline.position(profile))
        shadowing = progress.shadowing
        if shadowing is not None:
            profile.shadow = shadowing.state
            due = shadowing.engine.next_change_ms(self._view(profile, shadowing.state), user_id)
            if due is not None and (earliest is None or due < earliest):
                earliest = due
            profile.body_changed()
        if self.sweep_ms > 0:
            sweep = sweep_instant(user_id, profile.clock_ms, self.sweep_ms)
            if earliest is None or sweep < earliest:
                earliest = sweep
        if earliest is not None and (profile.timer_ms is None or earliest < profile.timer_ms):
            step.register_timer_ms = profile.timer_ms = earliest
        return step


# -- shadow agreement ------------------------------------------------------------------------------


@dataclass
class SegmentAgreement:
    """How the active version and the candidate in shadow agree on one segment over a window: the
    (user, segment) pairs each entered, and the share of each one's entries that re-enter a pair
    it had left within the window (flips)."""

    segment: str
    both: int = 0
    only_active: int = 0
    only_shadow: int = 0
    active_entries: int = 0
    shadow_entries: int = 0
    active_flips: int = 0
    shadow_flips: int = 0

    @property
    def agreement(self) -> float:
        """Pairs entered by both over pairs entered by either (1.0 when neither entered any)."""
        either = self.both + self.only_active + self.only_shadow
        return self.both / either if either else 1.0

    @property
    def active_flip_rate(self) -> float:
        """The active version's entries that are flips, as a share."""
        return self.active_flips / self.active_entries if self.active_entries else 0.0

    @property
    def shadow_flip_rate(self) -> float:
        """The candidate's entries that are flips, as a share."""
        return self.shadow_flips / self.shadow_entries if self.shadow_entries else 0.0


def shadow_agreement(
    active: Iterable[dict], shadow: Iterable[dict], start_ms: int, end_ms: int
) -> dict[str, SegmentAgreement]:
    """The agreement per segment of two transition streams (SegmentTransition records: the main
    output and the shadow output) over event time [start_ms, end_ms)."""

    def entries(records: Iterable[dict]) -> tuple[dict[str, set[tuple[str, str]]], Counter, Counter]:
        entered: dict[str, set[tuple[str, str]]] = defaultdict(set)
        count: Counter[str] = Counter()
        flips: Counter[str] = Counter()
        left: set[tuple[str, str]] = set()
        for t in sorted(records, key=lambda r: (r["event_time"], r["user_id"], r["segment"], r["sequence"])):
            if not start_ms <= t["event_time"] < end_ms:
                continue
            pair = (t["user_id"], t["segment"])
            if t["kind"] == "ENTER":
                entered[t["segment"]].add(pair)
                count[t["segment"]] += 1
                if pair in left:
                    flips[t["segment"]] += 1
            else:
                left.add(pair)
        return entered, count, flips

    active_entered, active_count, active_flips = entries(active)
    shadow_entered, shadow_count, shadow_flips = entries(shadow)
    report = {}
    for segment in sorted(set(active_entered) | set(shadow_entered)):
        a, s = active_entered.get(segment, set()), shadow_entered.get(segment, set())
        report[segment] = SegmentAgreement(
            segment,
            len(a & s),
            len(a - s),
            len(s - a),
            active_count[segment],
            shadow_count[segment],
            active_flips[segment],
            shadow_flips[segment],
        )
    return report
