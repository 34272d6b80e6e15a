#!/usr/bin/env bash
# The delta rows of bench/compare.sh with the receiver's disk writes, for the in-place delta (issue 14 item 2):
# ferry with in_place = "auto" (the default), ferry with in_place = "never" (a new partial and a rename, the
# behaviour before), and rsync (daemon on loopback), on the same edits of one file, in one run.
# Usage: bench/delta.sh [SIZE_MIB=512] [RUNS=3]. Prints a markdown table (medians of RUNS). Not run by CI.
set -euo pipefail
size_mib=${1:-512}
runs=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/ferry
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-delta.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
source bench/lib.sh
record() { echo "$2" >> "$work/results/$1"; }
result() { [ -s "$work/results/$1" ] && median < "$work/results/$1" || echo "n/a"; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
mkdir -p "$work/results"

start_ferry() { # start_ferry NAME MODE: a server rooted at $work/NAME with in_place = MODE; sets port_NAME, pid_NAME
  local name=$1 mode=$2
  rm -rf "$work/$name"
  mkdir -p "$work/$name"
  echo "in_place = \"$mode\"" > "$work/$name.toml"
  "$bin" -q serve --listen 127.0.0.1:0 --root "$work/$name" --config "$work/$name.toml" > "$work/$name.out" 2> /dev/null &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1200); do grep -q listening "$work/$name.out" 2> /dev/null && break; sleep 0.05; done
  eval "addr_$name=$(sed -n 's/^ferry: listening on //p' "$work/$name.out" | head -1)"
  eval "pid_$name=$pid"
}
start_rsync_daemon

head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"
edit_middle() { python3 -c '
import os, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(os.fstat(f.fileno()).st_size // 2)
    f.write(os.urandom(1 << 20))' "$1"; }
for run in $(seq "$runs"); do
  echo "delta: run $run" >&2
  start_ferry auto auto
  start_ferry never never
  rm -rf "$work/rsync-dst/"* "$work"/state-*
  for name in auto never; do
    cp "$work/src.bin" "$work/$name.bin"
    eval "addr=\$addr_$name"
    "$bin" push "$work/$name.bin" "ferry://$addr/f.bin" --state "$work/state-$name" --json > /dev/null
    edited "$work/$name.bin" edit_middle "$work/$name.bin"
    sync
    eval "pid=\$pid_$name"
    before=$(write_bytes "$pid"); t0=$(now)
    "$bin" push "$work/$name.bin" "ferry://$addr/f.bin" --state "$work/state-$name" --json > /dev/null
    record "time_$name" "$(since "$t0")"
    record "disk_$name" "$(($(write_bytes "$pid") - before))"
    cmp "$work/$name.bin" "$work/$name/f.bin"
  done
  cp "$work/src.bin" "$work/rsync.bin"
  rsync -t "$work/rsync.bin" "rsync://127.0.0.1:$rsync_port/dst/f.bin"
  edited "$work/rsync.bin" edit_middle "$work/rsync.bin"
  sync
  before=$(write_bytes "$rsync_pid"); t0=$(now)
  rsync -t "$work/rsync.bin" "rsync://127.0.0.1:$rsync_port/dst/f.bin"
  record time_rsync "$(since "$t0")"
  record disk_rsync "$(($(write_bytes "$rsync_pid") - before))"
  cmp "$work/rsync.bin" "$work/rsync-dst/f.bin"
  for name in auto never; do eval "kill \$pid_$name"; done
done
echo "| 1 MiB changed mid-file, ${size_mib} MiB | time (median of $runs) | receiver disk writes (MiB) |"
echo "|---|---|---|"
echo "| ferry, in_place = \"auto\" | $(result time_auto) s | $(mib "$(result disk_auto)") |"
echo "| ferry, in_place = \"never\" (before) | $(result time_never) s | $(mib "$(result disk_never)") |"
echo "| rsync (daemon, loopback) | $(result time_rsync) s | $(mib "$(result disk_rsync)") |"
