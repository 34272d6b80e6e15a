#!/usr/bin/env bash
# Client CPU of two ferry builds on a fresh push of a tree of small files: ROUNDS pushes each, alternated A, B, to
# one server (A's build), each into a new remote directory with a new client state; prints every push's client
# task-clock (`perf stat`) and the medians. The client's CPU is what the scan costs before the first byte moves, and
# it moves less between identical runs than wall time on a shared machine. Usage: bench/tree-client-ab.sh A_BIN
# B_BIN [FILES=10000] [ROUNDS=5]. Not run by CI. Each push's remote copy is removed after it.
set -euo pipefail
a_bin=$(realpath "$1")
b_bin=$(realpath "$2")
files=${3:-10000}
rounds=${4:-5}
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-tree-client-ab.XXXXXX")
server=
cleanup() { [ -n "$server" ] && kill "$server" 2> /dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
source "$(dirname "$0")/lib.sh"

make_small_tree "$work/tree" "$files"
"$a_bin" -q serve --listen 127.0.0.1:0 --root "$work/root" > "$work/server.out" &
server=$!
for _ in $(seq 1200); do grep -q listening "$work/server.out" 2> /dev/null && break; sleep 0.05; done
addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
for run in $(seq "$rounds"); do
  for label in a b; do
    bin=$a_bin; [ "$label" = b ] && bin=$b_bin
    rm -rf "$work/state"
    perf stat -x, -e task-clock -o "$work/stat" "$bin" -q push "$work/tree" "ferry://$addr/t$label$run" --state "$work/state"
    awk -F, '/task-clock/ {printf "%.0f\n", $1}' "$work/stat" >> "$work/$label.ms"
    rm -rf "$work/root/t$label$run"
    echo "tree-client-ab: round $run $label $(tail -1 "$work/$label.ms") ms" >&2
  done
done
echo "# bench/tree-client-ab.sh, $files files, $rounds rounds, $(date -u '+%F %H:%M UTC') ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
a=$(median < "$work/a.ms"); b=$(median < "$work/b.ms")
printf 'client task-clock ms  A %s  B %s  B/A %.2f   (A: %s; B: %s)\n' "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN{print b/a}')" \
  "$(paste -sd' ' "$work/a.ms")" "$(paste -sd' ' "$work/b.ms")"
