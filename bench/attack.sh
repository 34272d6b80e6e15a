#!/usr/bin/env bash
# Issue 12's "Done when" run: the offer flood, the frame trickle and the pre-auth slot attack together against a
# server with default limits, while a legitimate client pushes a file; reports whether the push landed, how long it
# took, and the server's peak RSS (VmHWM) against a quiet baseline push of the same file in the same run.
# Usage: bench/attack.sh [SECONDS=60] [SIZE_MIB=256]
# Loopback only: the attacker's idle connections come from 127.0.0.2 and up. Not run by CI.
set -euo pipefail
seconds=${1:-60}
size_mib=${2:-256}
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin ferry --example attack
bin=$PWD/target/release/ferry
attack=$PWD/target/release/examples/attack
work=$(mktemp -d)
trap 'kill "${server_pid:-0}" "${attack_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"
"$bin" -q token legit --out "$work/legit.token" > "$work/legit.toml"
"$bin" -q token attacker --out "$work/attacker.token" > "$work/attacker.toml"
cat "$work/legit.toml" "$work/attacker.toml" > "$work/server.toml"

start_server() {
  rm -rf "$work/root"
  "$bin" serve --config "$work/server.toml" --listen 127.0.0.1:0 --root "$work/root" > "$work/server.out" 2> "$work/server.err" &
  server_pid=$!
  for _ in $(seq 200); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
  [ -n "$addr" ] || { echo "server did not start" >&2; cat "$work/server.err" >&2; exit 1; }
}

peak_rss_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

legit_push() { # $1: label
  rm -rf "$work/state"
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  "$bin" push -q --json --token-file "$work/legit.token" --state "$work/state" "$work/src.bin" \
    "ferry://$addr/src.bin" > "$work/push-$1.json" 2> "$work/push-$1.err" || rc=$?
  t1=$(date +%s.%N)
  push_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
  push_rc=$rc
  cmp -s "$work/src.bin" "$work/root/legit/src.bin" && landed=yes || landed=no
}

# Baseline: the same push against a quiet server.
start_server
legit_push quiet
quiet_s=$push_s; quiet_rss=$(peak_rss_kib "$server_pid")
echo "quiet:    push exit $push_rc in ${quiet_s}s, landed=$landed, server peak RSS ${quiet_rss} KiB"
kill -INT "$server_pid"; wait "$server_pid" || true

# Under attack: all three attacks for $seconds, the legitimate push once the attack has run a third of that.
start_server
base_rss=$(rss_kib "$server_pid")
"$attack" "$addr" --slots 300 --trickle 64 --trickle-frame 25165824 --flood 60 --flood-chunks 500000 \
  --token-file "$work/attacker.token" --seconds "$seconds" > "$work/attack.out" 2>&1 &
attack_pid=$!
sleep "$((seconds / 3))"
legit_push attacked
wait "$attack_pid" || true
attacked_rss=$(peak_rss_kib "$server_pid")
echo "attacked: push exit $push_rc in ${push_s}s, landed=$landed, server RSS at start ${base_rss} KiB, peak ${attacked_rss} KiB"
echo "attack:   $(tail -n1 "$work/attack.out")"
echo "ratio:    attacked push / quiet push = $(awk -v a="$push_s" -v b="$quiet_s" 'BEGIN{printf "%.2f", a/b}')"
kill -INT "$server_pid"; wait "$server_pid" || true
[ "$landed" = yes ] && [ "$attacked_rss" -lt $((200 * 1024)) ]
