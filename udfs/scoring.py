"""Model scores per event: each model's manifest names an ordered feature vector read from the
profile, and an ONNX session scores it. Loading verifies every model before anything is scored.

A manifest (`models/<name>/manifest.json`, written by `segments train` or by hand for a model you
bring) declares the vector (feature, transform, what to do when it has no value), the feature
hash, the ONNX file's sha256, the input and output to use, the score's range (declared per model:
a probability's is [0, 1], a regression's is its manifest's `range`), thresholds,
training metrics and a golden set. `ModelRegistry.load` refuses a model whose file hash, feature
hash (the running feature code, fingerprinted by its behaviour) or golden outputs do not match,
with an error that says which and why. docs/models.md is the reference.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from mypy_extensions import mypyc_attr

from udfs import PACKAGE_DIR, read_at_import
from udfs.conditions import ModelOutput
from udfs.events import UserEvent
from udfs.features import DURATION, NUMBER, FeatureCatalog
from udfs.latency import LatencyHistogram
from udfs.profile import UserProfile, apply_event, prune
from udfs.profile_config import DAY_MS, HOUR_MS

MANIFEST = "manifest.json"
TRANSFORMS = ("identity", "log1p", "hours")
GOLDEN_TOLERANCE = 1e-4  # probabilities; relative for regressions; cluster ids must match exactly
KINDS = ("probability", "regression", "cluster")
# The behavioural fingerprint of the feature code: a fixed history of events checked into the
# repository (FINGERPRINT_EVENTS, an Avro object container file of UserEvent records), read at
# fixed instants. Any change to what a vector feature computes changes the values, hence the hash;
# edits that change nothing (comments, refactors) keep it, and so does a change to the traffic
# generator (the fixture was generated once, by models.train.write_fingerprint_events). The file's
# sha256 is pinned here: a changed fixture is an error, never a silent change of every hash.
FINGERPRINT_EVENTS = PACKAGE_DIR / "fingerprint_events.avro"
FINGERPRINT_EVENTS_SHA256 = "cc5e9243cd34dfeeda00022908bd6bf36cde81590d648d5bc143eedc28c45e81"
FINGERPRINT_START_MS = 1_600_000_000_000
FINGERPRINT_INSTANTS = tuple(FINGERPRINT_START_MS + DAY_MS * d + 7 * HOUR_MS for d in (1, 2, 4, 8))


_FINGERPRINT_BYTES = read_at_import(FINGERPRINT_EVENTS)  # see read_at_import: not later


@mypyc_attr(native_class=False)
class ModelVerificationError(RuntimeError):
    """A model that does not match its manifest or the running feature code: the job must not start."""

    pass


@dataclass(frozen=True)
class VectorFeature:
    """One input of a model: the feature, its transform and the value imputed when it has none."""

    name: str
    transform: str = "identity"
    impute: float | None = None  # the value used when the feature has none; None: skip scoring

    def as_dict(self) -> dict:
        """The feature as it is written in a manifest."""
        return {"name": self.name, "transform": self.transform, "impute": self.impute}


class FeatureVector:
    """An ordered list of scalar numeric features, transformed, with the missing-value policy."""

    def __init__(self, features: Iterable[VectorFeature], catalog: FeatureCatalog):
        self.features = tuple(features)
        self.catalog = catalog
        for f in self.features:
            spec = catalog.specs.get(f.name)
            if spec is None or spec.kind not in (NUMBER, DURATION):
                raise ModelVerificationError(f"vector feature {f.name!r} is not a numeric feature of the catalog")
            if f.transform not in TRANSFORMS:
                raise ModelVerificationError(
                    f"vector feature {f.name!r}: transform {f.transform!r} not one of {', '.join(TRANSFORMS)}"
                )
            if f.impute is not None and not math.isfinite(f.impute):
                raise ModelVerificationError(f"vector feature {f.name!r}: impute must be a finite number")
        self._readers = tuple((catalog.readers[f.name], _TRANSFORM[f.transform], f.impute) for f in self.features)
        self._named = tuple((f.name, _TRANSFORM[f.transform], f.impute) for f in self.features)
        self._fast = tuple(
            (
                f.name,
                None if f.transform == "identity" else _TRANSFORM[f.transform],
                None if f.impute is None else float(f.impute),
            )
            for f in self.features
        )

    @property
    def names(self) -> tuple[str, ...]:
        """The features' names, in input order."""
        return tuple(f.name for f in self.features)

    def spec(self) -> list[dict]:
        """The vector as it is written in a manifest."""
        return [f.as_dict() for f in self.features]

    def values(self, profile: UserProfile, now_ms: int) -> list[float] | None:
        """The vector at `now_ms`, or None when a feature without an impute value has no value
        (missing, NaN or infinite): such a vector is never passed to a model."""
        return self._vector((read(profile, now_ms), transform, impute) for read, transform, impute in self._readers)

    @staticmethod
    def _vector(raw_values) -> list[float] | None:
        out = []
        for raw, transform, impute in raw_values:
            if raw is None or not math.isfinite(raw):
                if impute is None:
                    return None
                out.append(float(impute))
            else:
                out.append(transform(float(raw)))
        return out

    def values_read(self, read: Callable[[str], Any]) -> list[float] | None:
        """`values` with the features taken from `read(name)`: the engine's per-instant feature
        cache, which the segment conditions and the other models' vectors read as well. One loop,
        run per event: identity transforms are skipped, the rest is `values`' arithmetic."""
        out: list[float] = []
        append, isfinite = out.append, math.isfinite
        for name, transform, impute in self._fast:
            raw = read(name)
            if raw is None or not isfinite(raw):
                if impute is None:
                    return None
                append(impute)
            elif transform is None:
                append(float(raw))
            else:
                append(transform(float(raw)))
        return out


_TRANSFORM = {
    "identity": lambda v: v,
    "log1p": lambda v: math.log1p(max(v, 0.0)),
    "hours": lambda v: v / HOUR_MS,
}


def vectors_at(
    events: Iterable[UserEvent], instants: Iterable[int], vector: FeatureVector
) -> Iterator[tuple[str, int, list[float] | None]]:
    """(user, T, vector at T) for every user with a profile at each instant T, in user order:
    events are applied in event-time order and each instant is read before any later event is
    applied, so a vector never sees the future (training rows are point-in-time correct)."""
    config = vector.catalog.config
    ordered = sorted(events, key=lambda e: (e.timestamp, e.user_id, e.event_id))
    profiles: dict[str, UserProfile] = {}
    i = 0
    for instant in sorted(instants):
        while i < len(ordered) and ordered[i].timestamp <= instant:
            e = ordered[i]
            profile = profiles.setdefault(e.user_id, UserProfile())
            apply_event(profile, e, config)
            prune(profile, config)
            i += 1
        for user_id in sorted(profiles):
            yield user_id, instant, vector.values(profiles[user_id], instant)


def _without_known_id(record: dict[str, Any]) -> dict[str, Any]:
    record.pop("known_user_id", None)
    return record


def fingerprint_events(data: bytes | OSError | None = None) -> list[UserEvent]:
    """The fingerprint history: the events of FINGERPRINT_EVENTS (read at import), after checking
    the file's sha256 against FINGERPRINT_EVENTS_SHA256. `data` replaces the file's bytes (tests)."""
    data = _FINGERPRINT_BYTES if data is None else data
    if isinstance(data, OSError):
        raise ModelVerificationError(f"the feature fingerprint's events cannot be read: {data}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != FINGERPRINT_EVENTS_SHA256:
        raise ModelVerificationError(
            f"{FINGERPRINT_EVENTS.name} has sha256 {digest[:16]}..., the code pins "
            f"{FINGERPRINT_EVENTS_SHA256[:16]}...: the fingerprint's events changed, which would change every "
            "model's feature hash (docs/models.md, Feature hash)"
        )
    import io
    from datetime import UTC, datetime, timedelta

    import fastavro

    epoch, ms = datetime(1970, 1, 1, tzinfo=UTC), timedelta(milliseconds=1)
    # Records of a record schema are dicts (fastavro types them as any Avro value).
    records = cast("Iterable[dict[str, Any]]", fastavro.reader(io.BytesIO(data)))
    # fastavro reads timestamp-millis as an aware datetime: back to int ms, exactly. A file
    # written with UserEvent v3 also has known_user_id (of identify records; null on events).
    return [
        UserEvent(**{**record, "timestamp": (record["timestamp"] - epoch) // ms})
        for record in map(_without_known_id, records)
    ]


def feature_hash(vector: FeatureVector, events: Iterable[UserEvent] | None = None) -> str:
    """sha256 of the vector's spec and its values over the fingerprint history (`events`, by
    default fingerprint_events())."""
    events = fingerprint_events() if events is None else events
    rows = [
        None if values is None else [float(f"{v:.9g}") for v in values]
        for _, _, values in vectors_at(events, FINGERPRINT_INSTANTS, vector)
    ]
    payload = json.dumps({"vector": vector.spec(), "values": rows}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ModelManifest:
    """A model's manifest (manifest.json): what the model reads and gives, and what verifies it."""

    name: str
    version: str
    kind: str  # probability | regression | cluster
    onnx_file: str
    onnx_sha256: str
    vector: list[VectorFeature]
    feature_hash: str
    input_name: str
    input_shape: list
    output_name: str
    output_index: int | None  # column of a 2-D output (the positive class), None for 1-D
    clusters: int | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    golden: list[dict] = field(default_factory=list)  # {"input": [...], "output": x}
    summaries: list[dict] = field(default_factory=list)  # cluster descriptions
    description: str = ""
    # [low, high] of a valid score: a probability's defaults to [0, 1] (a declared one must lie
    # within it); a regression declares its own; a cluster model's is its cluster ids.
    score_range: tuple[float, float] | None = None

    @classmethod
    def read(cls, path: Path) -> ModelManifest:
        """The manifest at `path`; a `ModelVerificationError` when it cannot be read or lacks a field."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelVerificationError(f"{path}: cannot read the manifest: {err}") from None
        try:
            vector = [VectorFeature(f["name"], f.get("transform", "identity"), f.get("impute")) for f in raw["vector"]]
            manifest = cls(
                name=raw["name"],
                version=str(raw["version"]),
                kind=raw["kind"],
                onnx_file=raw["onnx_file"],
                onnx_sha256=raw["onnx_sha256"],
                vector=vector,
                feature_hash=raw["feature_hash"],
                input_name=raw["input"]["name"],
                input_shape=raw["input"]["shape"],
                output_name=raw["output"]["name"],
                output_index=raw["output"].get("index"),
                clusters=raw.get("clusters"),
                thresholds=raw.get("thresholds", {}),
                metrics=raw.get("metrics", {}),
                golden=raw.get("golden", []),
                summaries=raw.get("summaries", []),
                description=raw.get("description", ""),
                score_range=_score_range(raw.get("range")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelVerificationError(f"{path}: manifest field missing or malformed: {err}") from None
        if manifest.kind not in KINDS:
            raise ModelVerificationError(f"{path}: kind must be one of {', '.join(KINDS)}, got {manifest.kind!r}")
        if manifest.kind == "regression" and manifest.score_range is None:
            raise ModelVerificationError(f"{path}: a regression model declares its range: [low, high]")
        if manifest.kind == "probability" and manifest.score_range is not None:
            low, high = manifest.score_range
            if low < 0.0 or high > 1.0:
                raise ModelVerificationError(f"{path}: a probability's range lies within [0, 1], got [{low}, {high}]")
        if manifest.kind == "cluster" and manifest.score_range is not None:
            raise ModelVerificationError(f"{path}: a cluster model's range is its cluster ids: declare clusters")
        if manifest.kind == "cluster" and not (isinstance(manifest.clusters, int) and manifest.clusters >= 2):
            raise ModelVerificationError(f"{path}: a cluster model declares clusters >= 2")
        if Path(manifest.onnx_file).name != manifest.onnx_file:
            raise ModelVerificationError(f"{path}: onnx_file must be a file name in the model's directory")
        return manifest

    def as_dict(self) -> dict:
        """The manifest as it is written to manifest.json."""
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "description": self.description,
            "onnx_file": self.onnx_file,
            "onnx_sha256": self.onnx_sha256,
            "vector": [f.as_dict() for f in self.vector],
            "feature_hash": self.feature_hash,
            "input": {"name": self.input_name, "shape": self.input_shape},
            "output": {"name": self.output_name, "index": self.output_index},
            "clusters": self.clusters,
            "thresholds": self.thresholds,
            "metrics": self.metrics,
            "golden": self.golden,
            "summaries": self.summaries,
            **({} if self.score_range is None else {"range": list(self.score_range)}),
        }

    @property
    def valid_range(self) -> tuple[float, float]:
        """[low, high] of a valid score (for a cluster model, its first and last cluster id)."""
        if self.kind == "cluster":
            return 0.0, float((self.clusters or 1) - 1)
        return self.score_range or (0.0, 1.0)

    def output(self) -> ModelOutput:
        """What conditions may read of this model: a score, or a cluster among named clusters."""
        if self.kind == "cluster":
            return ModelOutput(self.name, clusters=self.clusters)
        low, high = self.valid_range
        return ModelOutput(self.name, low=low, high=high)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _score_range(raw: Any) -> tuple[float, float] | None:
    """A manifest's `range`: [low, high], finite, low < high; absent is None."""
    if raw is None:
        return None
    if not (isinstance(raw, list) and len(raw) == 2 and all(_is_number(v) for v in raw)):
        raise ValueError(f"range must be [low, high], got {raw!r}")
    low, high = float(raw[0]), float(raw[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"range must be finite with low < high, got {raw!r}")
    return low, high


def import_on_a_python_thread(name: str):
    """Imports a module on a thread Python itself started. Why: in PyFlink's thread mode (PEMJA)
    an operator's thread state is unknown to PyGILState_Ensure, which onnxruntime's module init
    calls; imported on an operator thread other than the interpreter's first, the init waits for
    the GIL its own thread holds, and every Python operator of the job hangs (seen in the e2e
    test, where the keyed operator runs apart from the source's thread).

    One import at a time: two operators of a TaskManager open at once, and without the lock the
    second found the first's half-initialised module in sys.modules ("partially initialized module
    'onnxruntime' has no attribute 'SessionOptions'", seen on the standalone cluster)."""
    with _IMPORT_LOCK:
        if name in sys.modules:
            return sys.modules[name]
        return _import_on_a_new_thread(name)


_IMPORT_LOCK = threading.Lock()


def _import_on_a_new_thread(name: str):
    outcome: dict = {}

    def load() -> None:
        try:
            outcome["module"] = importlib.import_module(name)
        except BaseException as err:  # re-raised on the caller's thread
            outcome["error"] = err

    loader = threading.Thread(target=load, name=f"import-{name}", daemon=True)
    loader.start()
    loader.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["module"]


def manifest_digest(directory: Path) -> str:
    """sha256 of a model directory's manifest file: what a definitions file pins (the manifest
    holds the ONNX file's sha256, the vector, the golden set)."""
    return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()


class LoadedModel:
    """One verified ONNX session (one intra-op thread) with its preallocated input row."""

    def __init__(self, manifest: ModelManifest, onnx_bytes: bytes, vector: FeatureVector):
        np = import_on_a_python_thread("numpy")

        self.manifest = manifest
        self.vector = vector
        self.onnx_bytes = onnx_bytes  # the bytes whose hash was checked: sessions are built from them
        try:
            self.session = one_thread_session(onnx_bytes)
        except Exception as err:  # onnxruntime raises its own types (Fail, InvalidProtobuf, ...)
            first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise ModelVerificationError(
                f"model {manifest.name}: {manifest.onnx_file} is not a model onnxruntime "
                f"can load ({type(err).__name__}: {first_line})"
            ) from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if manifest.input_name not in inputs:
            raise ModelVerificationError(
                f"model {manifest.name}: the ONNX graph has no input {manifest.input_name!r} "
                f"(it has {', '.join(inputs)})"
            )
        width = inputs[manifest.input_name].shape[-1]
        if isinstance(width, int) and width != len(vector.features):
            raise ModelVerificationError(
                f"model {manifest.name}: the graph takes {width} features, the manifest's "
                f"vector has {len(vector.features)}"
            )
        if manifest.output_name not in outputs:
            raise ModelVerificationError(
                f"model {manifest.name}: the ONNX graph has no output "
                f"{manifest.output_name!r} (it has {', '.join(sorted(outputs))})"
            )
        self._row = np.zeros((1, len(vector.features)), dtype=np.float32)
        self._feeds = {manifest.input_name: self._row}
        self._outputs = [manifest.output_name]

    def score_vector(self, values: list[float]) -> float:
        """The model's output for one input vector."""
        self._row[0, :] = values
        result = self.session.run(self._outputs, self._feeds)[0]
        index = self.manifest.output_index
        value = result[0] if index is None else result[0][index]
        return float(value)


def one_thread_session(onnx_bytes: bytes):
    """An onnxruntime session over the model's bytes that runs on the caller's thread alone."""
    onnxruntime = import_on_a_python_thread("onnxruntime")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


class ModelRegistry:
    """The verified models of one models directory, for one feature catalog."""

    def __init__(self, models: dict[str, LoadedModel], catalog: FeatureCatalog):
        self.models = models
        self.catalog = catalog

    @classmethod
    def discover(cls, models_dir: Path) -> dict[str, Path]:
        """Model name -> directory, for every `<dir>/<name>/manifest.json`."""
        if not models_dir.is_dir():
            return {}
        return {p.parent.name: p.parent for p in sorted(models_dir.glob(f"*/{MANIFEST}"))}

    @classmethod
    def outputs_of(cls, models_dir: Path) -> dict[str, ModelOutput]:
        """What the definitions may reference, from the manifests alone (no verification)."""
        out = {}
        for directory in cls.discover(models_dir).values():
            manifest = ModelManifest.read(directory / MANIFEST)
            out[manifest.name] = manifest.output()
        return out

    @classmethod
    def load(
        cls,
        models_dir: Path,
        catalog: FeatureCatalog,
        names: Iterable[str] | None = None,
        pins: Mapping[str, str] | None = None,
    ) -> ModelRegistry:
        """Loads and verifies `names` (default: every model in the directory); a model in `pins`
        (name -> sha256 of its manifest file) must have exactly that manifest, so a model swapped
        on disk with a rewritten manifest is refused, not loaded."""
        available = cls.discover(models_dir)
        wanted = list(available) if names is None else list(names)
        models: dict[str, LoadedModel] = {}
        hashes: dict[str, str] = {}  # one fingerprint per distinct vector
        for name in wanted:
            if name not in available:
                raise ModelVerificationError(
                    f"model {name!r} not found in {models_dir} (found: {', '.join(available) or 'none'})"
                )
            directory = available[name]
            manifest = ModelManifest.read(directory / MANIFEST)
            pinned = (pins or {}).get(name)
            if pinned is not None and manifest_digest(directory) != pinned:
                raise ModelVerificationError(
                    f"model {name}: {directory / MANIFEST} has sha256 {manifest_digest(directory)[:16]}..., the "
                    f"definitions pin {pinned[:16]}...: not the model the definitions were validated with (after "
                    "retraining, `segments validate FILE --verbose` prints the installed models' pins)"
                )
            if manifest.name != name:
                raise ModelVerificationError(
                    f"{directory / MANIFEST}: names model {manifest.name!r}, but its directory is {name!r}"
                )
            onnx_path = directory / manifest.onnx_file
            if not onnx_path.is_file():
                raise ModelVerificationError(f"model {name}: {onnx_path} is missing")
            onnx_bytes = onnx_path.read_bytes()
            actual = hashlib.sha256(onnx_bytes).hexdigest()
            if actual != manifest.onnx_sha256:
                raise ModelVerificationError(
                    f"model {name}: {onnx_path.name} has sha256 {actual[:16]}..., the "
                    f"manifest says {manifest.onnx_sha256[:16]}...: the file is not the "
                    "one that was validated"
                )
            vector = FeatureVector(manifest.vector, catalog)
            key = json.dumps(vector.spec(), sort_keys=True)
            running = hashes.get(key) or hashes.setdefault(key, feature_hash(vector))
            if running != manifest.feature_hash:
                raise ModelVerificationError(
                    f"model {name}: feature hash mismatch (manifest {manifest.feature_hash[:16]}..., running code "
                    f"{running[:16]}...): the vector's features, their order, transforms or the code or profile "
                    "settings computing them differ from training; retrain or restore the feature code"
                )
            model = LoadedModel(manifest, onnx_bytes, vector)
            _check_golden(model)
            models[name] = model
        return cls(models, catalog)

    def outputs(self) -> dict[str, ModelOutput]:
        """What conditions may read of each loaded model, by name."""
        return {name: m.manifest.output() for name, m in self.models.items()}

    @property
    def version(self) -> str | None:
        """For transitions' model_version: every model's name and version."""
        return ",".join(f"{n}:{m.manifest.version}" for n, m in sorted(self.models.items())) or None


def _check_golden(model: LoadedModel) -> None:
    m = model.manifest
    if not m.golden:
        raise ModelVerificationError(f"model {m.name}: the manifest has no golden set to verify the model with")
    for i, case in enumerate(m.golden):
        values = case["input"]
        if len(values) != len(model.vector.features):
            raise ModelVerificationError(
                f"model {m.name}: golden input {i} has {len(values)} values, the vector {len(model.vector.features)}"
            )
        got, want = model.score_vector(values), float(case["output"])
        # A regression's output is in its own unit (currency for clv_30d): relative tolerance.
        tolerance = {"cluster": 0.0, "regression": GOLDEN_TOLERANCE * max(1.0, abs(want))}.get(m.kind, GOLDEN_TOLERANCE)
        if not abs(got - want) <= tolerance:
            raise ModelVerificationError(
                f"model {m.name}: golden case {i} scores {got!r}, the manifest expects {want!r} "
                f"(tolerance {tolerance:g})"
            )
        low, high = m.valid_range
        if not low <= want <= high:
            raise ModelVerificationError(
                f"model {m.name}: golden case {i} expects {want!r}, outside the manifest's range [{low:g}, {high:g}]: "
                "the declared range does not hold the model's own outputs"
            )


class MergedSession:
    """Every model of a registry as one ONNX graph in one session: one `run` per scoring instead
    of one per model (the call's fixed cost is most of a small model's inference time).

    The graphs are put side by side under per-model prefixes (onnx.compose.add_prefix); a graph
    written for an older opset of a domain than another model's is first converted to the newer
    one (onnx.version_converter). The result must reproduce every model's own session exactly on
    every golden input, or the registry is not loaded."""

    def __init__(self, models: dict[str, LoadedModel]):
        onnx = import_on_a_python_thread("onnx")
        from onnx import compose, helper, version_converter

        np = import_on_a_python_thread("numpy")
        protos = {name: onnx.load_model_from_string(m.onnx_bytes) for name, m in models.items()}
        opsets: dict[str, int] = {}
        for proto in protos.values():
            for op in proto.opset_import:
                opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        nodes, inputs, outputs, initializers, value_info = [], [], [], [], []
        self._outputs: list[str] = []
        self._feeds: dict[str, Any] = {}
        self._rows: dict[str, Any] = {}  # one input row per distinct vector, fed to each model reading it
        self._plan: list[tuple[str, LoadedModel]] = []
        for i, (name, proto) in enumerate(protos.items()):
            default = next((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), None)
            if default is not None and default < opsets.get("", default):
                proto = version_converter.convert_version(proto, opsets[""])
            prefix = f"m{i}_"
            proto = compose.add_prefix(proto, prefix)
            graph = proto.graph
            nodes += graph.node
            inputs += graph.input
            outputs += graph.output
            initializers += graph.initializer
            value_info += graph.value_info
            model = models[name]
            key = json.dumps(model.vector.spec(), sort_keys=True)
            row = self._rows.setdefault(key, np.zeros((1, len(model.vector.features)), dtype=np.float32))
            self._feeds[prefix + model.manifest.input_name] = row
            self._outputs.append(prefix + model.manifest.output_name)
            self._plan.append((key, model))
        merged = helper.make_model(
            helper.make_graph(nodes, "merged_models", inputs, outputs, initializers, value_info=value_info),
            opset_imports=[helper.make_opsetid(domain, version) for domain, version in sorted(opsets.items())],
            ir_version=max(p.ir_version for p in protos.values()),
        )
        self.session = one_thread_session(merged.SerializeToString())
        self._bind(np)
        self._check_against_each_model()

    def _bind(self, np) -> None:
        """Binds the input rows and preallocated output arrays to the session by address, so a
        `run` passes no arrays across: session.run wraps every feed and result at each call, and
        the merged call took 16.4 us that way against 11.6 us bound (a tight loop here). The
        arrays live as long as the session."""
        results = self.session.run(self._outputs, self._feeds)  # the outputs' shapes and types
        self._results = [np.empty_like(result) for result in results]
        binding = self.session.io_binding()
        for name, row in self._feeds.items():
            binding.bind_input(name, "cpu", 0, row.dtype, list(row.shape), row.ctypes.data)
        for name, result in zip(self._outputs, self._results, strict=True):
            binding.bind_output(name, "cpu", 0, result.dtype, list(result.shape), result.ctypes.data)
        self._binding = binding
        self._read = tuple(
            (result, model.manifest.output_index) for result, (_, model) in zip(self._results, self._plan, strict=True)
        )

    @property
    def plan(self) -> list[tuple[str, LoadedModel]]:
        """(vector key, model) in output order."""
        return self._plan

    def run(self, vectors: Mapping[str, list[float]]) -> list[float]:
        """Every model's score, in `plan` order, from the vectors by key."""
        for key, row in self._rows.items():
            row[0, :] = vectors[key]
        self.session.run_with_iobinding(self._binding)
        return [float(result[0] if index is None else result[0][index]) for result, index in self._read]

    def _check_against_each_model(self) -> None:
        for position, (key, model) in enumerate(self._plan):
            for case in model.manifest.golden:
                vectors = {k: [0.0] * row.shape[1] for k, row in self._rows.items()}
                vectors[key] = case["input"]
                got = self.run(vectors)[position]
                own = model.score_vector(case["input"])
                if got != own and not (math.isnan(got) and math.isnan(own)):
                    raise ModelVerificationError(
                        f"model {model.manifest.name}: merged with the other models it "
                        f"scores {got!r} on a golden input, its own session {own!r}"
                    )


@dataclass
class ScoringStats:
    """Counts of the scoring of one operator instance, and its latency, for the metrics."""

    scored: int = 0
    skipped: int = 0  # a vector feature had no value and no impute policy
    out_of_range: int = 0  # NaN, infinite, or outside the model's range: dropped
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class Scorer:
    """`SegmentEngine`'s scorer: every model once per accepted event, in one merged session."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.merged = MergedSession(registry.models)
        self.stats = ScoringStats()
        # Taken out of the plan once: each distinct vector, and per output its model's name,
        # whether its score is a cluster id (a whole number) and its valid range (the manifest's).
        self._vectors = tuple({key: model.vector for key, model in self.merged.plan}.items())
        self._outputs = tuple(
            (model.manifest.name, model.manifest.kind == "cluster", *model.manifest.valid_range)
            for _, model in self.merged.plan
        )

    def __call__(self, profile: UserProfile, now_ms: int, read: Callable[[str], Any]) -> Mapping[str, float]:
        """Scores at `now_ms`; `read(name)` is the feature's value at that instant."""
        stats = self.stats
        # Models reading the same vector share one read of it per event.
        vectors = {key: vector.values_read(read) for key, vector in self._vectors}
        raw: Sequence[float | None]
        if None not in vectors.values():
            started = time.perf_counter_ns()
            raw = self.merged.run(cast("dict[str, list[float]]", vectors))  # no None among them
            stats.latency.record((time.perf_counter_ns() - started) / 1000)
        else:  # a vector without a value: score the models that have one, each on its own
            each: list[float | None] = []
            raw = each
            for key, model in self.merged.plan:
                values = vectors[key]
                if values is None:
                    each.append(None)
                    continue
                started = time.perf_counter_ns()
                each.append(model.score_vector(values))
                stats.latency.record((time.perf_counter_ns() - started) / 1000)
        scores: dict[str, float] = {}
        isfinite = math.isfinite
        for (name, whole, low, high), score in zip(self._outputs, raw, strict=True):
            if score is None:
                stats.skipped += 1
                continue
            valid = isfinite(score) and low <= score <= high and (not whole or score == int(score))
            if not valid:
                stats.out_of_range += 1
                continue
            stats.scored += 1
            scores[name] = score
        return scores
