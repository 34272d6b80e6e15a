#!/usr/bin/env bash
# Where the CPU of a push over a 40 ms round trip goes: the same push of a random file through examples/delay_proxy
# (20 ms each way, as compare.sh) by ferry (default flags) and by rsync to an rsync daemon, alternated round by round,
# with the CPU time (user + system, ms) of each process that carries the bytes: the client, the receiver (ferry's
# server; the rsync daemon with the children it forked for the transfer) and the proxy between them.
# On a machine whose cores they share, the push cannot finish sooner than their sum over the cores.
# Prints each round and the medians. Usage: bench/cpu-rtt.sh [FERRY_BIN] [SIZE_MIB=512] [ROUNDS=5].
# PROXY_BIN points at a built delay_proxy (default: target/release/examples/delay_proxy). Needs rsync and perf
# (the client's CPU is `perf stat -e task-clock`). Not run by CI.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "${1:-$repo/target/release/ferry}")
size_mib=${2:-512}
rounds=${3:-5}
proxy_bin=${PROXY_BIN:-$repo/target/release/examples/delay_proxy}
for tool in rsync perf; do
  command -v "$tool" > /dev/null || { echo "cpu-rtt: needs $tool" >&2; exit 1; }
done
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
source "$repo/bench/lib.sh"
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"

now() { date +%s.%N; }
ms_since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%d", (b-a)*1000}'; }
# cpu_ms PID: user + system time of the process and its reaped children, in ms (/proc/PID/stat, 100 ticks a second).
cpu_ms() { awk '{print ($14 + $15 + $16 + $17) * 10}' "/proc/$1/stat"; }
# client_ms: the task-clock perf stat wrote for the last client.
client_ms() { awk -F, '/task-clock/ {printf "%d", $1}' "$work/client.perf"; }
record() { echo "$2" >> "$work/$1"; }

ferry_round() {
  rm -rf "$work/root" "$work/state" "$work/ferry.out"
  "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" > "$work/ferry.out" 2> /dev/null &
  local server=$!
  pids+=("$server")
  for _ in $(seq 1200); do grep -q listening "$work/ferry.out" 2> /dev/null && break; sleep 0.05; done
  start_proxy "$(sed -n 's/^ferry: listening on //p' "$work/ferry.out" | head -1)"
  local s0 p0 t0
  s0=$(cpu_ms "$server"); p0=$(cpu_ms "$proxy_pid"); t0=$(now)
  perf stat -x, -e task-clock -o "$work/client.perf" \
    "$bin" push "$work/src.bin" "ferry://$proxy_addr/src.bin" --state "$work/state" --json > /dev/null
  local wall server_ms proxy_ms
  wall=$(ms_since "$t0"); server_ms=$(($(cpu_ms "$server") - s0)); proxy_ms=$(($(cpu_ms "$proxy_pid") - p0))
  kill "$proxy_pid"; kill -INT "$server"; wait "$proxy_pid" "$server" 2> /dev/null || true
  cmp "$work/src.bin" "$work/root/src.bin"
  echo "ferry: wall $wall ms, client $(client_ms), server $server_ms, proxy $proxy_ms"
  record ferry_wall "$wall"; record ferry_client "$(client_ms)"; record ferry_receiver "$server_ms"
  record ferry_proxy "$proxy_ms"; record ferry_sum "$(($(client_ms) + server_ms + proxy_ms))"
}

rsync_round() {
  rm -rf "$work/rsync-dst/"*
  start_proxy "127.0.0.1:$rsync_port"
  local d0 p0 t0
  d0=$(cpu_ms "$rsync_pid"); p0=$(cpu_ms "$proxy_pid"); t0=$(now)
  perf stat -x, -e task-clock -o "$work/client.perf" rsync -t "$work/src.bin" "rsync://$proxy_addr/dst/src.bin"
  local wall proxy_ms
  wall=$(ms_since "$t0"); proxy_ms=$(($(cpu_ms "$proxy_pid") - p0))
  kill "$proxy_pid"; wait "$proxy_pid" 2> /dev/null || true
  # The daemon's forked receiver is reaped when the transfer ends: its time is then in the daemon's children.
  sleep 0.2
  local daemon_ms=$(($(cpu_ms "$rsync_pid") - d0))
  cmp "$work/src.bin" "$work/rsync-dst/src.bin"
  echo "rsync: wall $wall ms, client $(client_ms), daemon $daemon_ms, proxy $proxy_ms"
  record rsync_wall "$wall"; record rsync_client "$(client_ms)"; record rsync_receiver "$daemon_ms"
  record rsync_proxy "$proxy_ms"; record rsync_sum "$(($(client_ms) + daemon_ms + proxy_ms))"
}

start_rsync_daemon
for round in $(seq "$rounds"); do
  echo "cpu-rtt: round $round" >&2
  ferry_round
  rsync_round
done
echo
echo "medians of $rounds rounds, ${size_mib} MiB over a 40 ms round trip, ms:"
echo "| tool | wall | client CPU | receiver CPU | proxy CPU | sum of CPU |"
echo "|---|---|---|---|---|---|"
for tool in ferry rsync; do
  row="| $tool"
  for what in wall client receiver proxy sum; do row+=" | $(median < "$work/${tool}_$what")"; done
  echo "$row |"
done
