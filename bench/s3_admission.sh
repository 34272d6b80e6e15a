#!/usr/bin/env bash
# What counting quotas and limits from the bucket costs an offer (docs/object-store.md "Quotas, namespaces and
# limits"): a BASE ferry (counting from its own sled) and a NEW one (counting from the bucket) serve one Garage
# bucket prefix holding FILES committed files; ROUNDS times, a fresh 1 MiB file is pushed to each, alternating, and
# the client's duration_ms printed. NEW's first offer includes its first scan of files/.
#
#   GARAGE=… bench/s3_admission.sh BASE_BIN NEW_BIN [FILES=200] [ROUNDS=7]
set -euo pipefail
BASE=${1:?base ferry binary}; NEW=${2:?new ferry binary}; FILES=${3:-200}; ROUNDS=${4:-7}
HERE=$(cd "$(dirname "$0")/.." && pwd)
D=$(mktemp -d)
cleanup() {
  for pid in "$D"/*.pid; do [[ -f "$pid" ]] && kill "$(cat "$pid")" 2>/dev/null || true; done
  bash "$HERE/tests/garage/cluster.sh" stop "$D/cluster" >/dev/null 2>&1 || true
  rm -rf "$D"
}
trap cleanup EXIT
bash "$HERE/tests/garage/cluster.sh" start "$D/cluster" > "$D/env"
set -a; source "$D/env"; set +a
start() { # BIN NAME: starts a server of s3://ferry/bench, prints its address (bounded wait)
  "$1" serve --listen 127.0.0.1:0 --store s3://ferry/bench --state "$D/$2-state" > "$D/$2.out" 2> "$D/$2.log" &
  echo $! > "$D/$2.pid"   # a file: this runs in a command substitution's subshell
  for _ in $(seq 300); do grep -q "listening on" "$D/$2.out" 2>/dev/null && break; sleep 0.1; done
  sed -n 's/ferry: listening on //p' "$D/$2.out"
}
base=$(start "$BASE" base)
new=$(start "$NEW" new)
head -c 4096 /dev/urandom > "$D/small"
for i in $(seq "$FILES"); do
  echo "$i" >> "$D/small"
  "$BASE" push "$D/small" "ferry://$base/seed/$i" --state "$D/c0" --json -q > /dev/null
done
echo "round server duration_ms"
for r in $(seq "$ROUNDS"); do
  head -c 1048576 /dev/urandom > "$D/f"
  for who in "base:$base" "new:$new"; do
    name=${who%%:*}; addr=${who#*:}
    ms=$("$BASE" push "$D/f" "ferry://$addr/new/$name-$r" --state "$D/c-$name" --json | tail -1 |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["duration_ms"])')
    echo "$r $name $ms"
  done
done
