#!/usr/bin/env bash
# A/B of two ferry builds on the re-push of a file with 100 bytes inserted near the start, with the server's old
# version evicted from the page cache (the nightly case: yesterday's version is on disk, not in memory). Each round,
# per build: a fresh server and push of a random file, the insertion, `sync` and `drop_caches` (needs root), the
# edited source read back into the cache, then the timed re-push; the server's log gives when the offer was
# accepted (at once where the copy runs while the manifest streams), when a gathered offer's local copy ended,
# and when the file was committed. Builds alternate round by round. Not run by CI.
# Usage: bench/insert-cold.sh A_BIN B_BIN [SIZE_MIB=2048] [ROUNDS=2]
set -euo pipefail
a_bin=$(realpath "$1")
b_bin=$(realpath "$2")
size_mib=${3:-2048}
rounds=${4:-2}
work=$(mktemp -d)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
now() { date +%s.%N; }
round() {
  local bin=$1 addr t0 t1 lines
  rm -rf "$work/root" "$work/state"
  head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/f.bin"
  "$bin" -v serve --listen 127.0.0.1:0 --root "$work/root" > "$work/out" 2> "$work/err" &
  server_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/out" 2> /dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ferry: listening on //p' "$work/out")
  "$bin" -q push "$work/f.bin" "ferry://$addr/f.bin" --state "$work/state"
  python3 - "$work/f.bin" << 'PY'
import os, sys
path = sys.argv[1]
data = open(path, "rb").read()
open(path + ".new", "wb").write(data[:4096] + os.urandom(100) + data[4096:])
os.replace(path + ".new", path)
PY
  sync
  echo 3 > /proc/sys/vm/drop_caches
  cat "$work/f.bin" > /dev/null
  lines=$(wc -l < "$work/err")
  t0=$(now)
  "$bin" -q push "$work/f.bin" "ferry://$addr/f.bin" --state "$work/state"
  t1=$(now)
  cmp "$work/f.bin" "$work/root/f.bin"
  kill "$server_pid"; wait "$server_pid" 2> /dev/null || true
  tail -n +"$lines" "$work/err" | python3 -c '
import sys, datetime
t0, t1, name = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
def at(line):
    return datetime.datetime.fromisoformat(line.split()[0].rstrip("Z")).replace(tzinfo=datetime.timezone.utc).timestamp()
accepted = copied = committed = None
streamed = False
for line in sys.stdin:
    if "offer accepted" in line:
        accepted = at(line)
        streamed = "copying=true" in line
    if "reused local chunks" in line: copied = at(line)
    if "committed path=" in line: committed = at(line)
fmt = lambda v: "%.3f" % (v - t0) if v is not None else "-"
how = "copied as the manifest streamed" if streamed else f"copy done at {fmt(copied)} s"
print(f"{name}: insertion {t1 - t0:.3f} s (offer accepted at {fmt(accepted)} s, {how}, committed at {fmt(committed)} s)")
' "$t0" "$t1" "$(basename "$bin")"
}
echo "# bench/insert-cold.sh $size_mib MiB, $rounds rounds, $(date -u +%F) ($(nproc) cores)"
for _ in $(seq "$rounds"); do
  round "$a_bin"
  round "$b_bin"
done
