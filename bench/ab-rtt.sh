#!/usr/bin/env bash
# A/B of two ferry builds over a link with latency: the same push of a random file through examples/delay_proxy (20 ms
# each way, a 40 ms round trip, as compare.sh), default flags, binary A and binary B alternated round by round (and
# rsync to an rsync daemon through the same proxy, if rsync is installed), so the machine's noise hits all alike.
# Prints medians and ratios. Usage: bench/ab-rtt.sh A_BIN B_BIN [SIZE_MIB=512] [ROUNDS=5] [extra push args...].
# PROXY_BIN points at a built delay_proxy (default: target/release/examples/delay_proxy). AB_JOB=pull times a pull
# through the proxy instead (the file pushed first, directly; rsync then copies from its daemon); AB_JOB=noop times
# the re-push of an unchanged file (pushed first, directly, with the same state; rsync's copy made with `cp -p`).
# Not run by CI.
set -euo pipefail
a_bin=$(realpath "$1")
b_bin=$(realpath "$2")
size_mib=${3:-512}
rounds=${4:-5}
shift $(( $# < 4 ? $# : 4 ))
repo=$(cd "$(dirname "$0")/.." && pwd)
proxy_bin=${PROXY_BIN:-$repo/target/release/examples/delay_proxy}
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
source "$repo/bench/lib.sh"
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"

seconds() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f\n", b-a}'; }

# round BIN LABEL: a fresh server and state, one push through the proxy; appends the wall time to LABEL's file.
round() {
  local bin=$1 label=$2 addr server t0
  shift 2
  rm -rf "$work/root" "$work/state" "$work/server.out"; sync
  "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" > "$work/server.out" &
  server=$!
  pids+=("$server")
  for _ in $(seq 1200); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
  if [ "${AB_JOB:-push}" = pull ]; then
    "$bin" -q push "$work/src.bin" "ferry://$addr/src.bin" --state "$work/state"
    rm -rf "$work/pulled.bin" "$work/state"
  elif [ "${AB_JOB:-push}" = noop ]; then
    "$bin" -q push "$work/src.bin" "ferry://$addr/src.bin" --state "$work/state"
  fi
  start_proxy "$addr"
  t0=$(date +%s.%N)
  if [ "${AB_JOB:-push}" = pull ]; then
    "$bin" -q pull "ferry://$proxy_addr/src.bin" "$work/pulled.bin" --state "$work/state" "$@"
  else
    "$bin" -q push "$work/src.bin" "ferry://$proxy_addr/src.bin" --state "$work/state" "$@"
  fi
  seconds "$t0" "$(date +%s.%N)" >> "$work/$label"
  kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true
  kill -INT "$server"; wait "$server" || true
  if [ "${AB_JOB:-push}" = pull ]; then cmp "$work/src.bin" "$work/pulled.bin"; else cmp "$work/src.bin" "$work/root/src.bin"; fi
}

rsync_round() {
  local t0
  rm -rf "$work/rsync-dst/"* "$work/rsync-pulled.bin"
  [ "${AB_JOB:-push}" = push ] || cp -p "$work/src.bin" "$work/rsync-dst/src.bin"
  start_proxy "127.0.0.1:$rsync_port"
  t0=$(date +%s.%N)
  if [ "${AB_JOB:-push}" = pull ]; then
    rsync -t "rsync://$proxy_addr/dst/src.bin" "$work/rsync-pulled.bin"
  else
    rsync -t "$work/src.bin" "rsync://$proxy_addr/dst/src.bin"
  fi
  seconds "$t0" "$(date +%s.%N)" >> "$work/rsync"
  kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true
}

labels="a b"
if command -v rsync > /dev/null; then
  labels="a b rsync"
  start_rsync_daemon
fi

for i in $(seq "$rounds"); do
  if (( i % 2 )); then round "$a_bin" a "$@"; round "$b_bin" b "$@"; else round "$b_bin" b "$@"; round "$a_bin" a "$@"; fi
  [ "$labels" = "a b" ] || rsync_round
done
echo "# bench/ab-rtt.sh (${AB_JOB:-push}) $size_mib MiB over a 40 ms round trip, $rounds rounds, $(date -u +%F) ($(nproc) cores)"
for label in $labels; do
  printf '%-6s median %s s   (%s)\n' "$label" "$(median < "$work/$label")" "$(paste -sd' ' "$work/$label")"
done
a=$(median < "$work/a"); b=$(median < "$work/b")
printf 'B/A %.2f\n' "$(awk -v a="$a" -v b="$b" 'BEGIN{print b/a}')"
if [ "$labels" != "a b" ]; then
  r=$(median < "$work/rsync")
  printf 'A/rsync %.2f  B/rsync %.2f\n' "$(awk -v a="$a" -v r="$r" 'BEGIN{print a/r}')" "$(awk -v b="$b" -v r="$r" 'BEGIN{print b/r}')"
fi
