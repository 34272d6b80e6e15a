#!/usr/bin/env bash
# A fresh 1 GiB loopback push with each binary, alternated, 3 rounds; prints the client's rchar, syscr and CPU
# seconds (user + sys). The client's /proc/PID/io is read from a wrapper shell after it reaped the client (a reaped
# child's counts are added to its parent's). Usage: bench/push-io.sh BIN... Not run by CI.
set -euo pipefail
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
head -c $((1024*1024*1024)) /dev/urandom > "$work/src.bin"
for round in 1 2 3; do
  for bin in "$@"; do
    rm -rf "$work/root" "$work/state" "$work/server.out"
    "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" > "$work/server.out" 2>&1 &
    spid=$!
    for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
    addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
    out=$(bash -c '"$1" -q push "$2" "ferry://$3/src.bin" --state "$4" >/dev/null; t=($(cat /proc/$$/stat | cut -d" " -f16,17)); echo "$(grep -E "^(rchar|syscr)" /proc/$$/io | tr "\n" " ") cpu_s $(awk -v u=${t[0]} -v s=${t[1]} -v hz=$(getconf CLK_TCK) "BEGIN{print (u+s)/hz}")"' _ "$bin" "$work/src.bin" "$addr" "$work/state")
    echo "$(basename "$bin") $out"
    kill -INT $spid; wait $spid || true
  done
done
