#!/usr/bin/env bash
# Backup workloads (issue 3): bytes on the wire after an edit, and trees of many small files.
# Usage: bench/backup.sh [SIZE_MIB=256] [FILES=10000] [RUNS=3]
#   delta: a SIZE_MIB random file is pushed, edited, and pushed again; reports bytes sent/reused and wall time for
#          1 MiB changed mid-file and 100 bytes inserted near the start, with cdc (default) and fixed chunking, and
#          a fresh push of the edited file in the same run as the baseline.
#   tree:  FILES files of 4-64 KiB in 100 directories: fresh push, no-op re-push and a pull into an empty
#          directory, with `cp -a` + `sync` of the same tree in the same run as the disk baseline.
# Prints per-run figures and medians. Not run by CI (it needs about 4 x SIZE_MIB MiB of temp space).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
size_mib=${1:-256}
files=${2:-10000}
runs=${3:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/ferry
work=$(mktemp -d)
server_pid=
stop_server() { if [ -n "$server_pid" ]; then kill -INT "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; server_pid=; fi; }
trap 'stop_server; rm -rf "$work"' EXIT

start_server() {
  rm -rf "$work/root" "$work/state" "$work/pull-state"
  "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" > "$work/server.out" &
  server_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
}
now() { date +%s.%N; }
json() { python3 -c "import json,sys; print(json.loads(sys.stdin.readlines()[-1])['$1'])"; }
timed() { local t0; t0=$(now); "$@" > "$work/out.json"; awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }

echo "== delta: ${size_mib} MiB file, $runs runs"
python3 - "$work/base.bin" "$size_mib" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(os.urandom(1 << 20))
PY
python3 - "$work/base.bin" "$work/changed.bin" "$work/inserted.bin" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
mid = len(data) // 2
open(sys.argv[2], "wb").write(data[:mid] + b"\x5a" * (1 << 20) + data[mid + (1 << 20):])
open(sys.argv[3], "wb").write(data[:1000] + b"\x07" * 100 + data[1000:])
PY
: > "$work/delta"
for run in $(seq "$runs"); do
  for chunking in cdc fixed; do
    for edit in changed inserted; do
      start_server
      cp "$work/base.bin" "$work/file.bin"
      "$bin" push "$work/file.bin" "ferry://$addr/f.bin" --state "$work/state" --chunking "$chunking" --json > /dev/null
      cp "$work/$edit.bin" "$work/file.bin"
      sync # the edit's dirty pages must not compete with the push being timed
      t=$(timed "$bin" push "$work/file.bin" "ferry://$addr/f.bin" --state "$work/state" --chunking "$chunking" --json)
      sent=$(json bytes_sent < "$work/out.json"); reused=$(json bytes_reused < "$work/out.json")
      stop_server; sync; start_server
      fresh=$(timed "$bin" push "$work/file.bin" "ferry://$addr/f.bin" --state "$work/state" --chunking "$chunking" --json)
      stop_server
      echo "$chunking $edit $t $sent $reused $fresh" >> "$work/delta"
      echo "run $run $chunking $edit: ${t}s, sent $sent B, reused $reused B; fresh push of the same file ${fresh}s"
    done
  done
done
echo "medians (delta push s | bytes sent | bytes reused | fresh push s | delta/fresh):"
for chunking in cdc fixed; do
  for edit in changed inserted; do
    rows=$(grep "^$chunking $edit " "$work/delta")
    t=$(echo "$rows" | awk '{print $3}' | median); s=$(echo "$rows" | awk '{print $4}' | median)
    r=$(echo "$rows" | awk '{print $5}' | median); f=$(echo "$rows" | awk '{print $6}' | median)
    printf '  %-5s %-8s %6.3fs  %11d  %11d  %6.3fs  %.2f\n' "$chunking" "$edit" "$t" "$s" "$r" "$f" "$(awk -v a="$t" -v b="$f" 'BEGIN{print a/b}')"
  done
done

echo "== tree: $files files of 4-64 KiB, $runs runs"
python3 - "$work/tree" "$files" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(3)
for i in range(n):
    d = os.path.join(root, f"d{i % 100:02}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05}"), "wb") as f:
        f.write(os.urandom(rng.randint(4096, 65536)))
PY
: > "$work/trees"
for run in $(seq "$runs"); do
  rm -rf "$work/copy"; sync
  t0=$(now); cp -a "$work/tree" "$work/copy" && sync; cp_s=$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}')
  start_server
  fresh=$(timed "$bin" push "$work/tree" "ferry://$addr/t" --state "$work/state" --json)
  committed=$(json files_committed < "$work/out.json")
  noop=$(timed "$bin" push "$work/tree" "ferry://$addr/t" --state "$work/state" --json)
  needed=$(json files_needed < "$work/out.json")
  rm -rf "$work/restore"
  pulled=$(timed "$bin" pull "ferry://$addr/t" "$work/restore" --state "$work/pull-state" --json)
  stop_server
  diff -r "$work/tree" "$work/restore" > /dev/null
  echo "$fresh $noop $pulled $cp_s" >> "$work/trees"
  echo "run $run: fresh push ${fresh}s ($committed files), no-op re-push ${noop}s ($needed needed), pull ${pulled}s, cp -a + sync ${cp_s}s"
done
fresh=$(awk '{print $1}' "$work/trees" | median); noop=$(awk '{print $2}' "$work/trees" | median)
pulled=$(awk '{print $3}' "$work/trees" | median); cp_s=$(awk '{print $4}' "$work/trees" | median)
echo "medians: fresh push ${fresh}s, no-op ${noop}s, pull ${pulled}s, cp -a + sync ${cp_s}s (fresh/cp $(awk -v a="$fresh" -v b="$cp_s" 'BEGIN{printf "%.2f", a/b}'))"
