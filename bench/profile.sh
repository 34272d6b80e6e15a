#!/usr/bin/env bash
# CPU profiles of both processes of one push, for issue 14's "Profiles" notes in docs/benchmarks.md. Not run by CI.
# Usage: [FERRY_BIN=... FERRY_PROXY=...] bench/profile.sh fresh|rtt|resume [SIZE_MIB=1024] [OUT=/tmp/ferry-profile]
#   fresh:  a fresh push on loopback;
#   rtt:    a push through examples/delay_proxy (20 ms each way, as compare.sh), the proxy profiled too;
#   resume: a push SIGKILLed once the partial holds half the file, then the resume profiled.
# Writes OUT/{cli,srv[,px]}.perf (perf record -e cpu-clock, DWARF call graphs), OUT/srv.io (/proc/PID/io of the
# server over the profiled push, before and after), OUT/push.json and the client's debug log, and prints the top
# frames of each process. Wall-clock times on a shared machine mean little; samples, syscalls and bytes do.
set -euo pipefail
mode=${1:?usage: bench/profile.sh fresh|rtt|resume [SIZE_MIB] [OUT]}
size_mib=${2:-1024}
out=${3:-/tmp/ferry-profile}
cd "$(dirname "$0")/.."
# FERRY_BIN and FERRY_PROXY name prebuilt binaries (e.g. while the release build is not at hand); else built here.
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release --quiet
  [ "$mode" != rtt ] || cargo build --release --quiet --example delay_proxy
fi
bin=${FERRY_BIN:-$PWD/target/release/ferry}
proxy=${FERRY_PROXY:-$PWD/target/release/examples/delay_proxy}
rm -rf "$out"; mkdir -p "$out"
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$out/src.bin"
perf_args=(record -e cpu-clock -F 499 --call-graph "dwarf,16384")

"$bin" -q serve --listen 127.0.0.1:0 --root "$out/root" > "$out/srv.out" 2> /dev/null &
srv=$!
for _ in $(seq 200); do grep -q listening "$out/srv.out" 2> /dev/null && break; sleep 0.05; done
addr=$(sed -n 's/^ferry: listening on //p' "$out/srv.out" | head -1)
profiled=()
if [ "$mode" = rtt ]; then
  "$proxy" "$addr" 20 > "$out/proxy.out" &
  px=$!
  for _ in $(seq 100); do grep -q listening "$out/proxy.out" 2> /dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^listening on //p' "$out/proxy.out")
  perf "${perf_args[@]}" -p "$px" -o "$out/px.perf" 2> /dev/null &
  profiled+=($!)
fi
if [ "$mode" = resume ]; then
  "$bin" push "$out/src.bin" "ferry://$addr/src.bin" --state "$out/state" --json > /dev/null 2>&1 &
  client=$!
  half=$((size_mib * 1024 * 1024 / 2))
  for _ in $(seq 6000); do
    held=$(du -sb "$out/root/.ferry/partial" 2> /dev/null | awk '{print $1}')
    [ "${held:-0}" -ge "$half" ] && break
    sleep 0.05
  done
  kill -9 "$client"; wait "$client" 2> /dev/null || true
  sleep 0.5 # the server makes durable what it has once it sees the client gone
fi
sync
cat "/proc/$srv/io" > "$out/srv.io.before"
perf "${perf_args[@]}" -p "$srv" -o "$out/srv.perf" 2> /dev/null &
profiled+=($!)
sleep 0.3
t0=$(date +%s.%N)
RUST_LOG=ferry=debug perf "${perf_args[@]}" -o "$out/cli.perf" -- "$bin" push "$out/src.bin" "ferry://$addr/src.bin" \
  --state "$out/state" --json > "$out/push.json" 2> "$out/push.log" 3>&-
t1=$(date +%s.%N)
cat "/proc/$srv/io" > "$out/srv.io.after"
kill -INT "${profiled[@]}"; wait "${profiled[@]}" 2> /dev/null || true
if [ "$mode" = rtt ]; then kill -INT "$px"; wait "$px" 2> /dev/null || true; fi
kill -INT "$srv"; wait "$srv" 2> /dev/null || true
cmp "$out/src.bin" "$out/root/src.bin"
echo "profile: $mode, $size_mib MiB, $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') s wall (under perf)"
echo "server /proc/PID/io over the push:"
paste "$out/srv.io.before" "$out/srv.io.after" | awk '{print "  " $1, $4 - $2}'
grep "window grows" "$out/push.log" | sed 's/^/  /' || true
for p in cli srv px; do
  [ -f "$out/$p.perf" ] || continue
  echo "== $p"
  perf report -i "$out/$p.perf" --no-children --sort comm,sym --stdio -g none 2> /dev/null \
    | grep -E '^# Samples|%' | head -16
done
