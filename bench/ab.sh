#!/usr/bin/env bash
# A/B of two ferry builds: the same fresh loopback push (then the unchanged re-push, and a resume at 50 %) with binary A and
# binary B alternated round by round, so the machine's noise hits both alike. Prints medians and B/A ratios.
# server_cpu is the server's CPU over all three pushes of a round; server_fresh_cpu_gib its CPU seconds per GiB of the
# fresh push alone (from /proc/PID/stat around it).
# Usage: bench/ab.sh A_BIN B_BIN [SIZE_MIB=1024] [ROUNDS=5] [extra push args...]. Not run by CI.
# Make A from another commit with e.g. `git stash && cargo build --release && cp target/release/ferry /tmp/a`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
a_bin=$(realpath "$1")
b_bin=$(realpath "$2")
size_mib=${3:-1024}
rounds=${4:-5}
shift $(( $# < 4 ? $# : 4 ))
work=$(mktemp -d)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"

seconds() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f\n", b-a}'; }
# CPU ticks (user + system) a process used so far, threads included.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# round BIN LABEL: a fresh server and client state; appends the fresh and no-op wall times to LABEL's files.
round() {
  local bin=$1 label=$2 addr t0 t1 t2 t3
  shift 2
  # The last round's server.out goes first: the new server's redirection truncates it only once it runs, and a
  # grep before that would find the old address.
  rm -rf "$work/root" "$work/state" "$work/server.out"; sync
  /usr/bin/time -f '%U %S' -o "$work/server.cpu" "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" > "$work/server.out" &
  server_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
  local server_ferry c0
  server_ferry=$(awk '{print $1}' "/proc/$server_pid/task/$server_pid/children")  # time's child: the server
  c0=$(cpu_ticks "$server_ferry")
  t0=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o "$work/client.cpu" "$bin" -q push "$work/src.bin" "ferry://$addr/src.bin" --state "$work/state" "$@"
  t1=$(date +%s.%N)
  # The server's CPU seconds per GiB of the fresh push (its commit is done before the client returns).
  awk -v a="$c0" -v b="$(cpu_ticks "$server_ferry")" -v hz="$(getconf CLK_TCK)" -v mib="$size_mib" \
    'BEGIN{printf "%.3f\n", (b - a) / hz * 1024 / mib}' >> "$work/$label.server_fresh_cpu_gib"
  "$bin" -q push "$work/src.bin" "ferry://$addr/src.bin" --state "$work/state" "$@"
  t2=$(date +%s.%N)
  cmp "$work/src.bin" "$work/root/src.bin"
  # Resume: a new push killed once half the file is in the partial, then timed to completion.
  rm -rf "$work/root/src.bin" "$work/state"
  "$bin" -q push "$work/src.bin" "ferry://$addr/src.bin" --state "$work/state" "$@" &
  local client=$!
  for _ in $(seq 6000); do
    [ "$(du -sb "$work/root/.ferry/partial" 2>/dev/null | awk '{print $1}')" -ge "$((size_mib * 524288))" ] && break
    sleep 0.02
  done
  kill -9 "$client"; wait "$client" 2>/dev/null || true
  t3=$(date +%s.%N)
  "$bin" -q push "$work/src.bin" "ferry://$addr/src.bin" --state "$work/state" "$@"
  seconds "$t3" "$(date +%s.%N)" >> "$work/$label.resume"
  pkill -INT -P "$server_pid"; wait "$server_pid" || true  # GNU time ignores SIGINT: signal its child
  cmp "$work/src.bin" "$work/root/src.bin"
  seconds "$t0" "$t1" >> "$work/$label.fresh"
  seconds "$t1" "$t2" >> "$work/$label.noop"
  # CPU seconds (user + system) of the fresh push's client and of the server over all pushes.
  awk '{printf "%.2f\n", $1 + $2}' "$work/client.cpu" >> "$work/$label.client_cpu"
  awk 'END {printf "%.2f\n", $1 + $2}' "$work/server.cpu" >> "$work/$label.server_cpu"
}

for i in $(seq "$rounds"); do
  if (( i % 2 )); then round "$a_bin" a "$@"; round "$b_bin" b "$@"; else round "$b_bin" b "$@"; round "$a_bin" a "$@"; fi
done
echo "# bench/ab.sh $size_mib MiB, $rounds rounds, $(date -u +%F) ($(nproc) cores)"
for kind in fresh noop resume client_cpu server_cpu server_fresh_cpu_gib; do
  a=$(median < "$work/a.$kind"); b=$(median < "$work/b.$kind")
  printf '%-10s A %s s  B %s s  B/A %.2f   (A: %s; B: %s)\n' "$kind" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN{print b/a}')" \
    "$(paste -sd' ' "$work/a.$kind")" "$(paste -sd' ' "$work/b.$kind")"
done
