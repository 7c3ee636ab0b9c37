"""`segments train`: reproducible training of the shipped models from generated shopper history.

Training rows are point-in-time correct: each user's events are applied in event-time order and
the feature vector is read at a cut-off T with no event after T applied yet, by the same feature
code the job runs (`udfs.scoring.FeatureVector` over `udfs.features`); labels look only at events
after T. Models are validated on a time split (the held-out cut-offs come after every training
label window closes) and by cross-validation grouped by user, then exported with skl2onnx and
checked against scikit-learn before their manifests are written.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from udfs.events import UserEvent
from udfs.features import FeatureCatalog
from udfs.profile_config import DAY_MS, HOUR_MS, ProfileConfig
from udfs.scoring import (
    FINGERPRINT_EVENTS,
    FINGERPRINT_START_MS,
    MANIFEST,
    FeatureVector,
    ModelManifest,
    VectorFeature,
    feature_hash,
    vectors_at,
)
from udfs.shoppers import generate_events

NEVER_HOURS = 90 * 24.0  # recency imputed for "no such event": the profile retention, in hours
START_MS = 1_700_000_000_000
CUTOFF_HOUR = 10  # cut-offs at 10:00 of each day (generated time), when shoppers are about
PURCHASE_HORIZON_MS = DAY_MS
CHURN_HORIZON_MS = 14 * DAY_MS
GOLDEN_CASES = 12
ACTIVE_WITHIN_HOURS = 7 * 24.0
# The CLV model's history (models/clv.py): 30 days of warm-up, 30 days of label on each side of
# the time split's boundary and a few cut-offs on each side: longer than the classifiers', so it
# is generated on its own from the same seed, for fewer users (the memory of 1200 x 100 days).
CLV_USERS = 600
CLV_DAYS = 100

# The vector of the two classifiers: recency, frequency, monetary, cart and engagement signals.
BEHAVIOUR_VECTOR = (
    VectorFeature("ms_since_last_event", "hours", NEVER_HOURS),
    VectorFeature("ms_since_last_purchase", "hours", NEVER_HOURS),
    VectorFeature("ms_since_last_add_to_cart", "hours", NEVER_HOURS),
    VectorFeature("ms_since_cart_activity", "hours", NEVER_HOURS),
    VectorFeature("events_24h", "log1p"),
    VectorFeature("events_7d", "log1p"),
    VectorFeature("events_30d", "log1p"),
    VectorFeature("count_product_view_24h"),
    VectorFeature("count_add_to_cart_7d"),
    VectorFeature("count_purchase_30d"),
    VectorFeature("sessions_7d"),
    VectorFeature("sessions_30d"),
    VectorFeature("distinct_products_viewed_7d"),
    VectorFeature("spend_30d", "log1p"),
    VectorFeature("lifetime_orders"),
    VectorFeature("cart_items"),
    VectorFeature("cart_value", "log1p"),
    VectorFeature("checkout_pending"),
    VectorFeature("engagement_score", "log1p"),
    VectorFeature("current_session_events", "identity", 0.0),
)
# K-means on scaled RFM and engagement.
PERSONA_VECTOR = (
    VectorFeature("ms_since_last_event", "hours", NEVER_HOURS),
    VectorFeature("sessions_30d", "log1p"),
    VectorFeature("spend_30d", "log1p"),
    VectorFeature("engagement_score", "log1p"),
)


@dataclass
class TrainingSet:
    users: list[str]
    cutoffs: list[int]
    rows: np.ndarray  # float32, one row per (user, cut-off), in the vector's order
    purchase_24h: np.ndarray  # label: a purchase in (T, T + 24h]
    churn_14d: np.ndarray  # label: no event in (T, T + 14d]
    labelled_churn: np.ndarray  # whether the 14-day window closes within the history


def point_in_time_rows(
    events: Sequence[UserEvent], cutoffs: Sequence[int], vector: FeatureVector
) -> list[tuple[str, int, list[float]]]:
    """(user, T, vector at T) for every user with a profile and a complete vector at T; the
    vector is read before any event after T is applied (`udfs.scoring.vectors_at`)."""
    return [(u, t, v) for u, t, v in vectors_at(events, cutoffs, vector) if v is not None]


def build_training_set(
    events: Sequence[UserEvent], cutoffs: Sequence[int], vector: FeatureVector, history_end_ms: int
) -> TrainingSet:
    times_by_user: dict[str, list[int]] = defaultdict(list)
    purchases_by_user: dict[str, list[int]] = defaultdict(list)
    for e in events:
        times_by_user[e.user_id].append(e.timestamp)
        if e.event_type == "purchase":
            purchases_by_user[e.user_id].append(e.timestamp)
    for times in (*times_by_user.values(), *purchases_by_user.values()):
        times.sort()

    def any_within(times: list[int], after: int, horizon: int) -> bool:
        i = bisect.bisect_right(times, after)
        return i < len(times) and times[i] <= after + horizon

    rows = point_in_time_rows(events, cutoffs, vector)
    return TrainingSet(
        users=[u for u, _, _ in rows],
        cutoffs=[t for _, t, _ in rows],
        rows=np.array([v for _, _, v in rows], dtype=np.float32).reshape(len(rows), len(vector.features)),
        purchase_24h=np.array([any_within(purchases_by_user[u], t, PURCHASE_HORIZON_MS) for u, t, _ in rows]),
        churn_14d=np.array([not any_within(times_by_user[u], t, CHURN_HORIZON_MS) for u, t, _ in rows]),
        labelled_churn=np.array([t + CHURN_HORIZON_MS <= history_end_ms for _, t, _ in rows]),
    )


def _export(pipeline, name: str, n_features: int, classifier=None) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(classifier): {"zipmap": False}} if classifier is not None else None
    # A fixed graph name: skl2onnx's default is a random UUID, which would make the same seed
    # give different bytes (and sha256).
    return convert_sklearn(
        pipeline,
        name=name,
        initial_types=[("features", FloatTensorType([None, n_features]))],
        options=options,
        target_opset=17,
    ).SerializeToString()


def onnx_outputs(onnx_bytes: bytes, x: np.ndarray, output: str) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run([output], {"features": x.astype(np.float32)})[0]


def golden_set(rows, outputs, seed: int, cases: int, output_type) -> list[dict]:
    """Up to `cases` rows picked by `seed`, in row order, each with the exported model's output
    (as `output_type`): the manifest's golden set, which every worker checks the model against."""
    picked = np.random.default_rng(seed).choice(len(rows), size=min(cases, len(rows)), replace=False)
    return [{"input": [float(v) for v in rows[i]], "output": output_type(outputs[i])} for i in sorted(picked)]


def _write_model(out_dir: Path, manifest: ModelManifest, onnx_bytes: bytes) -> None:
    directory = out_dir / manifest.name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / manifest.onnx_file).write_bytes(onnx_bytes)
    (directory / MANIFEST).write_text(json.dumps(manifest.as_dict(), indent=1) + "\n")


def _classifier(
    name: str,
    description: str,
    x: np.ndarray,
    y: np.ndarray,
    users: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    vector: FeatureVector,
    hash_: str,
    threshold: float,
    seed: int,
    version: str,
) -> tuple[ModelManifest, bytes]:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import Pipeline

    def model():
        return GradientBoostingClassifier(n_estimators=100, max_depth=3, learning_rate=0.1, random_state=seed)

    folds = []
    for fit, check in GroupKFold(n_splits=5).split(x[train], y[train], users[train]):
        m = model().fit(x[train][fit], y[train][fit])
        if len(set(y[train][check])) == 2:
            folds.append(float(roc_auc_score(y[train][check], m.predict_proba(x[train][check])[:, 1])))
    classifier = model()
    pipeline = Pipeline([("gbt", classifier)]).fit(x[train], y[train])
    probabilities = pipeline.predict_proba(x[test])[:, 1]
    holdout_auc = float(roc_auc_score(y[test], probabilities))
    onnx_bytes = _export(pipeline, name, x.shape[1], classifier)
    exported = onnx_outputs(onnx_bytes, x[test], "probabilities")[:, 1]
    drift = float(np.max(np.abs(exported - probabilities)))
    if drift > 1e-4:
        raise RuntimeError(f"{name}: the ONNX export disagrees with scikit-learn by {drift}")
    golden = golden_set(x[test], exported, seed, GOLDEN_CASES, float)
    manifest = ModelManifest(
        name=name,
        version=version,
        kind="probability",
        onnx_file="model.onnx",
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        vector=list(vector.features),
        feature_hash=hash_,
        input_name="features",
        input_shape=[None, x.shape[1]],
        output_name="probabilities",
        output_index=1,
        thresholds={"high": threshold},
        metrics={
            "cv_roc_auc_mean": float(np.mean(folds)),
            "cv_roc_auc_std": float(np.std(folds)),
            "cv_folds": len(folds),
            "holdout_roc_auc": holdout_auc,
            "train_rows": int(train.sum()),
            "holdout_rows": int(test.sum()),
            "positive_rate_train": float(y[train].mean()),
            "positive_rate_holdout": float(y[test].mean()),
            "export_max_abs_diff": drift,
        },
        golden=golden,
        description=description,
    )
    return manifest, onnx_bytes


def _personas(
    x: np.ndarray, vector: FeatureVector, hash_: str, seed: int, version: str, k_range=range(2, 9)
) -> tuple[ModelManifest, bytes]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    scaled = StandardScaler().fit_transform(x)
    sample = np.random.default_rng(seed).choice(len(x), size=min(3000, len(x)), replace=False)
    silhouettes = {}
    for k in k_range:
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(scaled)
        silhouettes[k] = float(silhouette_score(scaled[sample], labels[sample]))
    best = max(silhouettes, key=lambda k: (silhouettes[k], -k))
    kmeans = KMeans(n_clusters=best, n_init=10, random_state=seed)
    pipeline = Pipeline([("scale", StandardScaler()), ("kmeans", kmeans)]).fit(x)
    labels = pipeline.predict(x)
    onnx_bytes = _export(pipeline, "personas", x.shape[1])
    exported = onnx_outputs(onnx_bytes, x, "label")
    agreement = float(np.mean(exported == labels))
    if agreement < 0.999:
        raise RuntimeError(f"personas: the ONNX export agrees with scikit-learn on only {agreement:.2%} of rows")
    golden = golden_set(x, exported, seed, GOLDEN_CASES, int)
    manifest = ModelManifest(
        name="personas",
        version=version,
        kind="cluster",
        onnx_file="model.onnx",
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        vector=list(vector.features),
        feature_hash=hash_,
        input_name="features",
        input_shape=[None, x.shape[1]],
        output_name="label",
        output_index=None,
        clusters=best,
        metrics={
            "silhouette_by_k": {str(k): v for k, v in silhouettes.items()},
            "chosen_k": best,
            "silhouette": silhouettes[best],
            "rows": len(x),
            "export_label_agreement": agreement,
        },
        golden=golden,
        summaries=_cluster_summaries(x, labels, best, vector),
        description="Shopper personas: K-means on scaled recency, frequency, monetary value and engagement",
    )
    return manifest, onnx_bytes


def _cluster_summaries(x: np.ndarray, labels: np.ndarray, k: int, vector: FeatureVector) -> list[dict]:
    """Each cluster in words: its size and mean feature values, named by how it differs from the
    population (z-score of its mean above +0.5 or below -0.5)."""
    words = {  # feature -> (word when high, word when low)
        "ms_since_last_event": ("lapsed", "recent"),
        "sessions_30d": ("frequent", "occasional"),
        "spend_30d": ("high-spend", "low-spend"),
        "engagement_score": ("engaged", "passive"),
    }
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    out = []
    for c in range(k):
        members = x[labels == c]
        centre = members.mean(axis=0)
        z = (centre - mean) / std
        traits = [
            words[f.name][0 if zi > 0 else 1]
            for f, zi in zip(vector.features, z, strict=True)
            if f.name in words and abs(zi) > 0.5
        ]
        means = {
            f.name: float(np.expm1(v)) if f.transform == "log1p" else float(v)
            for f, v in zip(vector.features, centre, strict=True)
        }
        out.append(
            {"cluster": c, "share": float(len(members) / len(x)), "name": ", ".join(traits) or "average", "mean": means}
        )
    return out


@dataclass
class TrainingReport:
    manifests: list[ModelManifest]
    events: int
    users: int

    def lines(self) -> list[str]:
        out = [f"history: {self.users} users, {self.events} events"]
        for m in self.manifests:
            metrics = m.metrics
            if m.kind == "probability":
                out.append(
                    f"{m.name} v{m.version}: holdout ROC-AUC {metrics['holdout_roc_auc']:.3f} "
                    f"(time split, {metrics['holdout_rows']} rows), CV ROC-AUC "
                    f"{metrics['cv_roc_auc_mean']:.3f} ± {metrics['cv_roc_auc_std']:.3f} "
                    f"({metrics['cv_folds']} folds by user, {metrics['train_rows']} rows), positive rate "
                    f"{metrics['positive_rate_train']:.3f}"
                )
            elif m.kind == "regression":
                out.append(
                    f"{m.name} v{m.version}: holdout MAE {metrics['holdout_mae']:.2f}, RMSE "
                    f"{metrics['holdout_rmse']:.2f} against the last-30-days baseline's MAE "
                    f"{metrics['baseline_mae']:.2f}, RMSE {metrics['baseline_rmse']:.2f} (time split, "
                    f"{metrics['holdout_rows']} rows, mean spend {metrics['holdout_mean_spend']:.2f}; trained on "
                    f"{metrics['train_rows']} rows of {metrics['history_users']} users x {metrics['history_days']} "
                    f"days); range [{m.valid_range[0]:g}, {m.valid_range[1]:g}]"
                )
            else:
                by_k = ", ".join(f"k={k}: {v:.3f}" for k, v in metrics["silhouette_by_k"].items())
                out.append(f"{m.name} v{m.version}: k={m.clusters} by silhouette ({by_k})")
                for s in m.summaries:
                    out.append(
                        f"  cluster {s['cluster']} ({s['share']:.0%}): {s['name']}; "
                        + ", ".join(f"{n} {v:.1f}" for n, v in s["mean"].items())
                    )
        return out


def train(
    out_dir: Path,
    users: int = 1200,
    days: int = 35,
    seed: int = 1,
    version: str = "1",
    config: ProfileConfig | None = None,
    clv_users: int = CLV_USERS,
    clv_days: int = CLV_DAYS,
    progress: Callable[[str], None] = lambda _: None,
) -> TrainingReport:
    config = config or ProfileConfig()
    catalog = FeatureCatalog(config)
    end = START_MS + days * DAY_MS
    progress(f"generating {users} users x {days} days (seed {seed})")
    events = list(generate_events(users, seed, START_MS, days * DAY_MS))
    cutoffs = [START_MS + d * DAY_MS + CUTOFF_HOUR * HOUR_MS for d in range(3, days - 1)]
    behaviour = FeatureVector(BEHAVIOUR_VECTOR, catalog)
    progress(f"point-in-time rows at {len(cutoffs)} cut-offs")
    data = build_training_set(events, cutoffs, behaviour, end)
    cutoff_arr, users_arr = np.array(data.cutoffs), np.array(data.users)
    behaviour_hash = feature_hash(behaviour)
    manifests = []

    # Time split: held-out cut-offs start once every training label window has closed.
    def split(horizon: int, usable: np.ndarray):
        low, high = cutoffs[0] + horizon, max(c for c, ok in zip(data.cutoffs, usable, strict=True) if ok)
        if low >= high:
            raise ValueError(
                f"{days} days of history are too few for a time split with a "
                f"{horizon // DAY_MS}-day label window; give at least {2 * horizon // DAY_MS + 6}"
            )
        boundary = low + int((high - low) * 0.7)
        train_mask = usable & (cutoff_arr + horizon <= boundary)
        test_mask = usable & (cutoff_arr >= boundary)
        return train_mask, test_mask

    progress("training purchase_propensity")
    labelled = cutoff_arr + PURCHASE_HORIZON_MS <= end
    fit, hold = split(PURCHASE_HORIZON_MS, labelled)
    manifest, onnx_bytes = _classifier(
        "purchase_propensity",
        "Probability of a purchase within the next 24 hours",
        data.rows,
        data.purchase_24h,
        users_arr,
        fit,
        hold,
        behaviour,
        behaviour_hash,
        0.7,
        seed,
        version,
    )
    _write_model(out_dir, manifest, onnx_bytes)
    manifests.append(manifest)

    progress("training churn_risk")
    fit, hold = split(CHURN_HORIZON_MS, data.labelled_churn)
    manifest, onnx_bytes = _classifier(
        "churn_risk",
        "Probability of no activity at all in the next 14 days",
        data.rows,
        data.churn_14d,
        users_arr,
        fit,
        hold,
        behaviour,
        behaviour_hash,
        0.8,
        seed,
        version,
    )
    _write_model(out_dir, manifest, onnx_bytes)
    manifests.append(manifest)

    progress("clustering personas")
    personas = FeatureVector(PERSONA_VECTOR, catalog)
    last_rows = point_in_time_rows(events, [cutoffs[-1]], personas)
    # Personas describe active shoppers: users gone for a week or more would form a cluster of
    # their own that the churn model already covers.
    x = np.array([v for _, _, v in last_rows if v[0] < ACTIVE_WITHIN_HOURS], dtype=np.float32)
    manifest, onnx_bytes = _personas(x, personas, feature_hash(personas), seed, version)
    _write_model(out_dir, manifest, onnx_bytes)
    manifests.append(manifest)
    event_count = len(events)
    del events  # the CLV history is generated next: one history in memory at a time

    from models.clv import CLV_NAME, train_and_export  # models.clv reads this module's helpers

    progress(f"training {CLV_NAME} on {clv_users} users x {clv_days} days (seed {seed})")
    clv_events = list(generate_events(clv_users, seed, START_MS, clv_days * DAY_MS))
    manifest, onnx_bytes = train_and_export(
        clv_events, START_MS, clv_days, CUTOFF_HOUR, catalog, seed, version, GOLDEN_CASES
    )
    _write_model(out_dir, manifest, onnx_bytes)
    manifests.append(manifest)
    return TrainingReport(manifests, event_count, users)


# How the fingerprint's events (udfs/fingerprint_events.avro) were generated.
FINGERPRINT_USERS, FINGERPRINT_SEED, FINGERPRINT_DAYS = 24, 97, 9
FINGERPRINT_SYNC_MARKER = b"segments-fprint!"  # fixed, so the same events give the same file


def write_fingerprint_events(path: Path = FINGERPRINT_EVENTS) -> str:
    """Regenerates the feature fingerprint's events from the traffic generator and returns the
    file's sha256, to be pinned as udfs.scoring.FINGERPRINT_EVENTS_SHA256. Only for a deliberate
    change of the fingerprint: it changes every model's feature hash, so every manifest (retrain
    with `segments train`) and every definitions file's pins (docs/models.md)."""
    import fastavro

    from udfs.codec import SCHEMAS_DIR

    schema = fastavro.parse_schema(json.loads((SCHEMAS_DIR / "user_event.avsc").read_text()))
    events = generate_events(FINGERPRINT_USERS, FINGERPRINT_SEED, FINGERPRINT_START_MS, FINGERPRINT_DAYS * DAY_MS)
    with open(path, "wb") as out:
        fastavro.writer(
            out,
            schema,
            (e.to_record() for e in events),
            codec="deflate",
            codec_compression_level=9,
            sync_marker=FINGERPRINT_SYNC_MARKER,
            sync_interval=1 << 20,
        )
    return hashlib.sha256(path.read_bytes()).hexdigest()
