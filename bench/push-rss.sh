#!/usr/bin/env bash
# Peak RSS and wall time of a fresh loopback push (issue 2's "1 GiB under 100 MiB per process").
# Usage: bench/push-rss.sh [SIZE_MIB=1024] [RUNS=3]
# Prints per-run figures (with what the server read from disk) and medians, with `cp` + `sync` of the same file in the
# same run as the disk baseline.
# Not run by CI: it writes SIZE_MIB * (RUNS + 2) MiB to a temp dir.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
size_mib=${1:-1024}
runs=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/ferry
work=$(mktemp -d)
trap 'pkill -P "${server_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"

field() { awk -F': ' -v k="$1" '$1 ~ k {print $2}' "$2"; }
elapsed_s() { field "Elapsed" "$1" | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }'; }

: > "$work/results"
for run in $(seq "$runs"); do
  rm -rf "$work/root" "$work/state" "$work/copy.bin"; sync
  /usr/bin/time -v -o "$work/cp.time" sh -c "cp '$work/src.bin' '$work/copy.bin' && sync"
  /usr/bin/time -v -o "$work/server.time" "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" > "$work/server.out" &
  server_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
  /usr/bin/time -v -o "$work/client.time" "$bin" push "$work/src.bin" "ferry://$addr/src.bin" --state "$work/state" --json > "$work/push.json"
  # What the server read back from disk (read_bytes) for the push: the digest follower's read-back, if any.
  server_read=$(awk '/^read_bytes/ {printf "%d", $2 / 1048576}' "/proc/$(pgrep -P "$server_pid")/io")
  pkill -INT -P "$server_pid"; wait "$server_pid" || true
  cmp "$work/src.bin" "$work/root/src.bin"
  printf '%s %s %s %s\n' "$(elapsed_s "$work/client.time")" "$(elapsed_s "$work/cp.time")" \
    "$(field "Maximum resident" "$work/client.time")" "$(field "Maximum resident" "$work/server.time")" >> "$work/results"
  echo "run $run: push $(elapsed_s "$work/client.time")s, cp+sync $(elapsed_s "$work/cp.time")s," \
    "client RSS $(field "Maximum resident" "$work/client.time") KiB, server RSS $(field "Maximum resident" "$work/server.time") KiB," \
    "server read from disk ${server_read} MiB"
done
push=$(awk '{print $1}' "$work/results" | median)
cp=$(awk '{print $2}' "$work/results" | median)
echo "median of $runs, ${size_mib} MiB: push ${push}s, cp+sync ${cp}s (ratio $(awk -v a="$push" -v b="$cp" 'BEGIN{printf "%.2f", a/b}')),"\
  "client peak RSS $(awk '{print $3}' "$work/results" | median) KiB, server peak RSS $(awk '{print $4}' "$work/results" | median) KiB"
