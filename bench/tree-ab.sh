#!/usr/bin/env bash
# A/B of two ferry builds on a fresh push of a tree of small files, beside `rsync -a` (to an rsync daemon) + `sync`,
# alternated round by round so the machine's noise hits all three alike. Prints medians, B/A and each against rsync.
# Usage: bench/tree-ab.sh A_BIN B_BIN [FILES=10000] [ROUNDS=5]. Not run by CI. The tree is that of bench/compare.sh
# (4–64 KiB files, 500 per directory). Every push writes into new directories and nothing is deleted until the end:
# ext4 scans inodes freed in the last half minute when it allocates new ones nearby (bench/compare.sh, section 5).
set -euo pipefail
a_bin=$(realpath "$1")
b_bin=$(realpath "$2")
files=${3:-10000}
rounds=${4:-5}
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-tree-ab.XXXXXX")
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f\n", b-a}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
source "$(dirname "$0")/lib.sh"

make_small_tree "$work/tree" "$files"

start_rsync_daemon

# ferry_round BIN LABEL RUN: a fresh server and client state, one timed push of the tree.
ferry_round() {
  local bin=$1 label=$2 run=$3 addr server written ticks t0
  rm -rf "$work/state"
  rm -f "$work/server.out"
  "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root-$label-$run" > "$work/server.out" &
  server=$!
  pids+=("$server")
  for _ in $(seq 1200); do grep -q listening "$work/server.out" 2> /dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
  sync
  written=$(write_bytes "$server"); ticks=$(cpu_ticks "$server")
  t0=$(now)
  /usr/bin/time -f '%U %S' -o "$work/client.cpu" "$bin" -q push "$work/tree" "ferry://$addr/tree" --state "$work/state"
  since "$t0" >> "$work/$label.fresh"
  echo "$(( ($(write_bytes "$server") - written) / 1048576 ))" >> "$work/$label.written_mib"
  awk -v t="$(( $(cpu_ticks "$server") - ticks ))" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.2f\n", t/hz}' >> "$work/$label.server_cpu"
  awk '{printf "%.2f\n", $1 + $2}' "$work/client.cpu" >> "$work/$label.client_cpu"
  kill -INT "$server"; wait "$server" || true
  diff -r "$work/tree" "$work/root-$label-$run/tree" > /dev/null
}
rsync_round() {
  local run=$1 written t0
  sync
  written=$(write_bytes "$rsync_pid")
  t0=$(now)
  rsync -a "$work/tree/" "rsync://127.0.0.1:$rsync_port/dst/tree-$run/"
  sync
  since "$t0" >> "$work/rsync.fresh"
  echo "$(( $(daemon_writes_since "$written") / 1048576 ))" >> "$work/rsync.written_mib"
}

for run in $(seq "$rounds"); do
  echo "tree-ab: round $run" >&2
  if (( run % 2 )); then
    ferry_round "$a_bin" a "$run"; ferry_round "$b_bin" b "$run"; rsync_round "$run"
  else
    rsync_round "$run"; ferry_round "$b_bin" b "$run"; ferry_round "$a_bin" a "$run"
  fi
done
echo "# bench/tree-ab.sh, $files files, $rounds rounds, $(date -u '+%F %H:%M UTC') ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
for kind in fresh written_mib server_cpu client_cpu; do
  a=$(median < "$work/a.$kind"); b=$(median < "$work/b.$kind")
  printf '%-11s A %s  B %s  B/A %.2f   (A: %s; B: %s)\n' "$kind" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN{print (a > 0) ? b/a : 0}')" \
    "$(paste -sd' ' "$work/a.$kind")" "$(paste -sd' ' "$work/b.$kind")"
done
r=$(median < "$work/rsync.fresh")
printf 'rsync -a + sync %s s, writes %s MiB   (%s)\n' "$r" "$(median < "$work/rsync.written_mib")" "$(paste -sd' ' "$work/rsync.fresh")"
printf 'vs rsync -a + sync: A %.2f  B %.2f\n' "$(awk -v a="$(median < "$work/a.fresh")" -v r="$r" 'BEGIN{print a/r}')" \
  "$(awk -v b="$(median < "$work/b.fresh")" -v r="$r" 'BEGIN{print b/r}')"
