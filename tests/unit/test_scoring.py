"""The manifest guard and per-event scoring: wrong file hash, wrong feature order, changed feature
code, golden mismatch and a model emitting NaN each get the documented behaviour."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from udfs import scoring
from udfs.conditions import ModelOutput
from udfs.definitions import parse_definitions
from udfs.events import UserEvent
from udfs.features import FeatureCatalog
from udfs.profile import UserProfile
from udfs.profile_config import HOUR_MS, ProfileConfig
from udfs.scoring import (
    MANIFEST,
    FeatureVector,
    ModelManifest,
    ModelRegistry,
    ModelVerificationError,
    Scorer,
    VectorFeature,
    feature_hash,
)
from udfs.segmentation import Segmentation
from udfs.transitions import SegmentEngine

T0 = 1_700_000_000_000
CATALOG = FeatureCatalog(ProfileConfig())


@pytest.fixture
def models(small_models, tmp_path) -> Path:
    """A private copy of the trained models, free to tamper with."""
    out, _ = small_models
    copy = tmp_path / "models"
    shutil.copytree(out, copy)
    return copy


def edit_manifest(directory: Path, change) -> None:
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_untouched_models_load(models):
    assert set(ModelRegistry.load(models, CATALOG).models) == {
        "purchase_propensity",
        "churn_risk",
        "personas",
        "clv_30d",
    }


def test_a_changed_onnx_file_is_refused_by_its_hash(models):
    with open(models / "churn_risk" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelVerificationError, match="churn_risk: model.onnx has sha256 .* not the one"):
        ModelRegistry.load(models, CATALOG)


def pinned(models: Path, text_for: dict[str, str] | None = None) -> str:
    """Definitions reading churn_risk, pinned to the manifest in `models` (or to `text_for`)."""
    digest = hashlib.sha256((models / "churn_risk" / MANIFEST).read_bytes()).hexdigest()
    pins = text_for or {"churn_risk": f"sha256:{digest}"}
    lines = "".join(f"  {name}: {value}\n" for name, value in pins.items())
    return f"version: v\nmodels:\n{lines}segments:\n  - name: risky\n    when: score.churn_risk > 0.5\n"


def test_a_model_swapped_with_a_rewritten_manifest_is_refused_by_the_definitions_pin(models, tmp_path):
    """Issue 19: the manifest's own ONNX hash proves nothing once both files are replaced; the
    definitions' pin of the manifest does."""
    definitions = tmp_path / "d.yaml"
    definitions.write_text(pinned(models))
    assert Segmentation.load(definitions, models_dir=models).registry.models.keys() == {"churn_risk"}
    # Another model (here: the same one, retrained with a different note) with a consistent manifest.
    edit_manifest(models / "churn_risk", lambda m: m.update(description=m["description"] + " (swapped)"))
    ModelRegistry.load(models, CATALOG, ["churn_risk"])  # loads without the pin
    with pytest.raises(ModelVerificationError, match="churn_risk: .*manifest.json has sha256 .* the definitions pin"):
        Segmentation.load(definitions, models_dir=models)


@pytest.mark.parametrize(
    "pins, message",
    [
        ({"churn_risk": "sha256:abc"}, "must be sha256: and 64 lowercase hex digits"),
        ({"churn_risk": "ab" * 32}, "must be sha256: and 64 lowercase hex digits"),
        ({"churn_risk": f"sha256:{'0' * 64}", "personas": f"sha256:{'0' * 64}"}, "unknown key 'personas' in models"),
    ],
)
def test_model_pins_are_checked_when_the_definitions_are_read(models, pins, message):
    with pytest.raises(Exception, match=message):
        parse_definitions(pinned(models, pins), models=ModelRegistry.outputs_of(models))


def test_pinning_some_of_the_models_read_but_not_all_is_refused(models):
    text = pinned(models).replace("score.churn_risk > 0.5", "score.churn_risk > 0.5 and score.personas == 1")
    with pytest.raises(Exception, match="models pins some models but not personas"):
        parse_definitions(text, models=ModelRegistry.outputs_of(models))


def test_a_corrupted_onnx_file_is_a_clear_verification_error_not_a_traceback(models):
    onnx_path = models / "churn_risk" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:200])  # truncated, its manifest hash rewritten to match
    edit_manifest(
        models / "churn_risk", lambda m: m.update(onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest())
    )
    with pytest.raises(ModelVerificationError, match="churn_risk: model.onnx is not a model onnxruntime can load"):
        ModelRegistry.load(models, CATALOG, ["churn_risk"])


def test_the_shipped_definitions_pin_the_shipped_models():
    from jobs.settings import SHIPPED_DEFINITIONS
    from udfs.segmentation import DEFAULT_MODELS_DIR

    loaded = Segmentation.load(SHIPPED_DEFINITIONS)
    assert set(loaded.definitions.model_pins) == set(loaded.definitions.models) == set(loaded.registry.models)
    for name, digest in loaded.definitions.model_pins.items():
        assert hashlib.sha256((DEFAULT_MODELS_DIR / name / MANIFEST).read_bytes()).hexdigest() == digest


def test_a_wrong_feature_order_is_refused_by_the_feature_hash(models):
    def swap(manifest):
        v = manifest["vector"]
        v[0], v[1] = v[1], v[0]

    edit_manifest(models / "purchase_propensity", swap)
    with pytest.raises(ModelVerificationError, match="purchase_propensity: feature hash mismatch"):
        ModelRegistry.load(models, CATALOG, ["purchase_propensity"])


def test_changed_feature_code_is_refused_by_the_feature_hash(models, monkeypatch):
    # A feature reader that computes something else (here: events_24h off by one) ...
    catalog = FeatureCatalog(ProfileConfig())
    original = catalog.readers["events_24h"]
    monkeypatch.setitem(catalog.readers, "events_24h", lambda p, t: original(p, t) + 1)
    with pytest.raises(ModelVerificationError, match="feature hash mismatch"):
        ModelRegistry.load(models, catalog, ["purchase_propensity"])
    # ... and profile settings that change what the features mean (engagement weights).
    reweighted = FeatureCatalog(
        ProfileConfig(engagement_weights={**ProfileConfig().engagement_weights, "video_play": 20.0})
    )
    with pytest.raises(ModelVerificationError, match="feature hash mismatch"):
        ModelRegistry.load(models, reweighted, ["personas"])
    # A change the features do not read leaves the hash alone (no retraining for a refactor).
    assert ModelRegistry.load(models, FeatureCatalog(ProfileConfig(max_seen_event_ids=4096)), ["personas"])


def test_the_fingerprint_events_are_the_pinned_fixture():
    data = scoring.FINGERPRINT_EVENTS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == scoring.FINGERPRINT_EVENTS_SHA256
    events = scoring.fingerprint_events()
    assert len(events) == 3903 and len({e.user_id for e in events}) == 23
    assert all(isinstance(e.timestamp, int) for e in events)
    # A changed or unreadable fixture is an error naming the file, never a silently different hash.
    with pytest.raises(ModelVerificationError, match="fingerprint_events.avro has sha256 .* the code pins"):
        scoring.fingerprint_events(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ModelVerificationError, match="cannot be read"):
        scoring.fingerprint_events(FileNotFoundError("no such file"))


def test_the_shipped_manifests_feature_hashes_come_from_the_fixture():
    from udfs.segmentation import DEFAULT_MODELS_DIR

    manifests = sorted(DEFAULT_MODELS_DIR.glob(f"*/{MANIFEST}"))
    assert [p.parent.name for p in manifests] == ["churn_risk", "clv_30d", "personas", "purchase_propensity"]
    for path in manifests:
        manifest = ModelManifest.read(path)
        assert feature_hash(FeatureVector(manifest.vector, CATALOG)) == manifest.feature_hash, path.parent.name


def test_the_traffic_generator_does_not_change_the_feature_hash(monkeypatch):
    import udfs.shoppers

    vector = FeatureVector(
        [VectorFeature("events_24h"), VectorFeature("ms_since_last_event", "hours", 2160.0)], CATALOG
    )
    before = feature_hash(vector)
    other = [UserEvent("x-1", "x", "page_view", scoring.FINGERPRINT_START_MS + HOUR_MS)]
    assert feature_hash(vector, other) != before  # other events would change it ...
    monkeypatch.setattr(udfs.shoppers, "generate_events", lambda *args, **kwargs: iter(other))
    assert feature_hash(vector) == before  # ... but the generator's output is not read


def test_the_fingerprint_fixture_round_trips_through_its_writer(tmp_path, monkeypatch):
    import models.train

    written = [
        UserEvent(
            "u-1",
            "u",
            "purchase",
            scoring.FINGERPRINT_START_MS + 1,
            session_id="s",
            price=12.5,
            quantity=2,
            device="mobile",
        ),
        UserEvent("u-2", "u", "search", scoring.FINGERPRINT_START_MS + HOUR_MS, properties={"query": "q"}),
    ]
    monkeypatch.setattr(models.train, "generate_events", lambda *args, **kwargs: iter(written))
    digest = models.train.write_fingerprint_events(tmp_path / "events.avro")
    monkeypatch.setattr(scoring, "FINGERPRINT_EVENTS_SHA256", digest)
    assert scoring.fingerprint_events((tmp_path / "events.avro").read_bytes()) == written


def test_a_golden_case_that_no_longer_matches_is_refused(models):
    edit_manifest(
        models / "purchase_propensity", lambda m: m["golden"][0].__setitem__("output", m["golden"][0]["output"] + 0.01)
    )
    with pytest.raises(ModelVerificationError, match="golden case 0 scores"):
        ModelRegistry.load(models, CATALOG, ["purchase_propensity"])


def test_unknown_models_and_misnamed_outputs_are_refused(models):
    with pytest.raises(ModelVerificationError, match="model 'lifetime_value' not found"):
        ModelRegistry.load(models, CATALOG, ["lifetime_value"])
    edit_manifest(models / "churn_risk", lambda m: m["output"].__setitem__("name", "proba"))
    with pytest.raises(ModelVerificationError, match="no output 'proba'"):
        ModelRegistry.load(models, CATALOG, ["churn_risk"])


def test_definitions_reading_a_score_need_the_model(models):
    text = "version: v\nsegments:\n  - name: likely\n    when: score.purchase_propensity > 0.7\n"
    assert Segmentation.from_text(text.encode(), "d.yaml", models_dir=models).registry is not None
    with pytest.raises(ValueError, match="unknown model score 'purchase_propensity'"):
        Segmentation.from_text(text.encode(), "d.yaml", models_dir=models / "nowhere")


def test_scores_are_the_models_outputs_for_the_profiles_vector(models):
    registry = ModelRegistry.load(models, CATALOG)
    scorer = Scorer(registry)
    profile = UserProfile()
    engine = SegmentEngine(parse_definitions("version: v\nsegments:\n  - name: x\n    when: false\n"))
    for i, kind in enumerate(["page_view", "product_view", "add_to_cart", "checkout_start"]):
        engine.on_event(
            "u", profile, UserEvent(f"e{i}", "u", kind, T0 + i * 60_000, product_id="p", quantity=1, price=30.0)
        )
    scores = scorer(profile, profile.clock_ms, lambda name: CATALOG.read(name, profile, profile.clock_ms))
    for name, model in registry.models.items():
        vector = np.array([model.vector.values(profile, profile.clock_ms)], dtype=np.float32)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # as the job's sessions
        session = onnxruntime.InferenceSession(
            str(models / name / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        out = session.run([model.manifest.output_name], {"features": vector})[0]
        expected = float(out[0] if model.manifest.output_index is None else out[0][model.manifest.output_index])
        assert scores[name] == expected
    assert 0 <= scores["purchase_propensity"] <= 1 and scores["personas"] in range(
        registry.models["personas"].manifest.clusters
    )
    # Four scores from one call of the merged session.
    assert scorer.stats.scored == 4 and scorer.stats.latency.total == 1


def nan_model(directory: Path) -> None:
    """A 'probability' model whose output is sqrt(cart_items - 1): NaN for an empty cart, above 1
    for four items, valid in between. Its golden set covers only the valid inputs."""
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 1])
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["features", "one"], ["shifted"]),
            helper.make_node("Sqrt", ["shifted"], ["probability"]),
        ],
        "nan_model",
        [x],
        [y],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True)
    data = model.SerializeToString()
    onnx.checker.check_model(model)
    (directory / "model.onnx").write_bytes(data)
    vector = FeatureVector([VectorFeature("cart_items")], CATALOG)
    manifest = ModelManifest(
        name="nan_model",
        version="1",
        kind="probability",
        onnx_file="model.onnx",
        onnx_sha256=hashlib.sha256(data).hexdigest(),
        vector=list(vector.features),
        feature_hash=feature_hash(vector),
        input_name="features",
        input_shape=[None, 1],
        output_name="probability",
        output_index=0,
        golden=[{"input": [1.0], "output": 0.0}, {"input": [2.0], "output": 1.0}],
    )
    (directory / MANIFEST).write_text(json.dumps(manifest.as_dict()))


def test_a_model_emitting_nan_is_flagged_and_its_score_dropped(tmp_path):
    nan_model(tmp_path / "nan_model")
    registry = ModelRegistry.load(tmp_path, CATALOG)  # the golden set passes: NaN only off it
    definitions = parse_definitions(
        "version: v\nsegments:\n  - name: scored_high\n    when: score.nan_model > 0.5\n"
        "  - name: unscored\n    when: missing(score.nan_model)\n",
        models={"nan_model": ModelOutput("nan_model")},
    )
    engine = SegmentEngine(definitions, registry.version, Scorer(registry))
    profile = UserProfile()
    # An empty cart: sqrt(-1) = NaN -> flagged, dropped; conditions see a missing score.
    out = engine.on_event("u", profile, UserEvent("e1", "u", "page_view", T0))
    assert engine.scorer.stats.out_of_range == 1 and profile.scores == {}
    assert [(t.segment, t.kind, t.scores) for t in out] == [("unscored", "ENTER", {})]
    # Two items: sqrt(1) = 1.0 -> a valid score, the segment enters, the transition records it.
    out = engine.on_event(
        "u", profile, UserEvent("e2", "u", "add_to_cart", T0 + 1, product_id="p", quantity=2, price=1.0)
    )
    assert profile.scores == {"nan_model": 1.0}
    assert sorted((t.segment, t.kind) for t in out) == [("scored_high", "ENTER"), ("unscored", "EXIT")]
    assert all(t.scores == {"nan_model": 1.0} for t in out)
    # Four items: sqrt(3) > 1 is outside a probability's range: flagged and dropped as well.
    engine.on_event("u", profile, UserEvent("e3", "u", "add_to_cart", T0 + 2, product_id="q", quantity=2, price=1.0))
    assert engine.scorer.stats.out_of_range == 2 and profile.scores == {}


def test_a_missing_feature_without_an_impute_value_skips_scoring(tmp_path):
    vector = FeatureVector([VectorFeature("ms_since_last_purchase", "hours")], CATALOG)
    profile = UserProfile()
    assert vector.values(profile, T0) is None
    imputed = FeatureVector([VectorFeature("ms_since_last_purchase", "hours", 2160.0)], CATALOG)
    assert imputed.values(profile, T0) == [2160.0]
    with pytest.raises(ModelVerificationError, match="not a numeric feature"):
        FeatureVector([VectorFeature("engagement_tier")], CATALOG)
    with pytest.raises(ModelVerificationError, match="impute must be a finite number"):
        FeatureVector([VectorFeature("cart_items", impute=math.nan)], CATALOG)


def test_rescore_every_rescores_quiet_users_on_a_timer():
    """A churn-like score that grows with silence: scored at the event, then every 6 h after
    the latest scoring while no event comes; the segment enters at the first rescoring that sees
    the score above 0.5 (hours idle / 48 > 0.5: after 24 h, so at the 30 h rescoring), and an
    event starts the 6-HOUR_MS rhythm again from itself."""
    definitions = parse_definitions(
        "version: v\nrescore_every: 6h\nsegments:\n  - name: going_quiet\n    when: score.idle > 0.5\n",
        models={"idle": ModelOutput("idle")},
    )
    calls = []

    def idle_scorer(profile, now, read):
        calls.append(now)
        return {"idle": min(1.0, (now - profile.last_event_ms) / (48 * HOUR_MS))}

    engine = SegmentEngine(definitions, "idle:1", idle_scorer)
    profile = UserProfile()
    assert engine.on_event("u", profile, UserEvent("e1", "u", "page_view", T0)) == []
    assert engine.next_change_ms(profile) == T0 + 6 * HOUR_MS
    [enter] = engine.advance_to("u", profile, T0 + 40 * HOUR_MS)
    assert (enter.kind, enter.event_time, enter.cause, enter.scores) == (
        "ENTER",
        T0 + 30 * HOUR_MS,
        "TIMER",
        {"idle": 30 / 48},
    )
    assert calls == [T0 + h * HOUR_MS for h in (0, 6, 12, 18, 24, 30, 36)]
    [exit_] = engine.on_event("u", profile, UserEvent("e2", "u", "page_view", T0 + 41 * HOUR_MS))
    assert (exit_.kind, exit_.cause, exit_.scores) == ("EXIT", "EVENT", {"idle": 0.0})
    assert engine.next_change_ms(profile) == T0 + 47 * HOUR_MS


def test_rescore_every_needs_a_score_to_rescore():
    with pytest.raises(ValueError, match="rescore_every is set but no condition reads a model score"):
        parse_definitions("version: v\nrescore_every: 6h\nsegments:\n  - name: a\n    when: cart_items > 0\n")
