#!/usr/bin/env bash
# A/B of two ferry builds on the delta re-pushes: a fresh push of a random file, then 1 MiB changed mid-file and
# re-pushed, then 100 bytes inserted near the start and re-pushed, with binary A and binary B alternated round by
# round (each round a fresh server root and client state). Prints each round's re-push times; the file is checked
# against the server's copy after each round. With AB_PIN=1 the client runs on CPU 0 and the server on CPU 1
# (taskset), as if they were two machines: on this 2-core box they otherwise take CPU from each other. Not run by CI.
# Usage: [AB_PIN=1] bench/delta-ab.sh A_BIN B_BIN [SIZE_MIB=2048] [ROUNDS=3]
set -euo pipefail
a_bin=$(realpath "$1")
b_bin=$(realpath "$2")
size_mib=${3:-2048}
rounds=${4:-3}
work=$(mktemp -d)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"
if [ "${AB_PIN:-0}" = 1 ]; then client_cpu=(taskset -c 0); server_cpu=(taskset -c 1); else client_cpu=(); server_cpu=(); fi
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }

round() {
  local bin=$1 addr t0 middle insert
  rm -rf "$work/root" "$work/state" "$work/server.out"
  cp "$work/src.bin" "$work/edit.bin"
  "${server_cpu[@]}" "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" > "$work/server.out" &
  server_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/server.out" 2> /dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
  "${client_cpu[@]}" "$bin" -q push "$work/edit.bin" "ferry://$addr/edit.bin" --state "$work/state"
  python3 - "$work/edit.bin" << 'PY'
import os, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(os.fstat(f.fileno()).st_size // 2)
    f.write(os.urandom(1 << 20))
PY
  t0=$(now)
  "${client_cpu[@]}" "$bin" -q push "$work/edit.bin" "ferry://$addr/edit.bin" --state "$work/state"
  middle=$(since "$t0")
  python3 - "$work/edit.bin" << 'PY'
import os, sys
path = sys.argv[1]
data = open(path, "rb").read()
open(path + ".new", "wb").write(data[:4096] + os.urandom(100) + data[4096:])
os.replace(path + ".new", path)
PY
  t0=$(now)
  "${client_cpu[@]}" "$bin" -q push "$work/edit.bin" "ferry://$addr/edit.bin" --state "$work/state"
  insert=$(since "$t0")
  kill "$server_pid"; wait "$server_pid" 2> /dev/null || true
  cmp "$work/edit.bin" "$work/root/edit.bin"
  echo "$(basename "$bin"): 1 MiB changed mid-file $middle s, 100 B inserted near the start $insert s"
}

echo "# bench/delta-ab.sh $size_mib MiB, $rounds rounds, $(date -u +%F) ($(nproc) cores, AB_PIN=${AB_PIN:-0})"
for _ in $(seq "$rounds"); do
  round "$a_bin"
  round "$b_bin"
done
