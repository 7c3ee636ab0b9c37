#!/usr/bin/env bash
# Builds the project's Java operators (infra/java/src/segments: the Redis view sink, the keying of
# raw user events) into one jar, reproducibly: compiled
# with javac against the Flink jars in FLINK_LIB (nothing else is needed: Flink's own API, slf4j),
# packaged with `jar` with fixed entry times, sorted entries and no manifest, so the same sources
# and JDK give the same bytes.
#
#   infra/java/build.sh FLINK_LIB OUT_JAR
#
# infra/setup.sh calls it (cached by the sources' hash); the Dockerfile does too.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIB="$1"
OUT="$2"
command -v javac >/dev/null || { echo "javac (a JDK 17) is required to build the Java operators" >&2; exit 1; }
compgen -G "$LIB/flink-dist*.jar" >/dev/null || { echo "no flink-dist jar in $LIB" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/classes"
find "$HERE/src" -name '*.java' | LC_ALL=C sort > "$WORK/sources"
javac -Xlint:all -Werror --release 17 -implicit:none -cp "$LIB/*" -d "$WORK/classes" @"$WORK/sources"
(cd "$WORK/classes" && find . -type f | LC_ALL=C sort | sed 's|^\./||' > "$WORK/entries")
(cd "$WORK/classes" && jar --create --no-manifest --date=2000-01-01T00:00:02Z --file "$WORK/out.jar" @"$WORK/entries")
mkdir -p "$(dirname "$OUT")"
mv "$WORK/out.jar" "$OUT"
