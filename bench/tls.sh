#!/usr/bin/env bash
# The cost of TLS: the same fresh loopback push with and without TLS (pinned `ferry keygen` certificate), and with
# a client token on top, interleaved in one run so the machine's noise hits all three alike.
# Usage: bench/tls.sh [SIZE_MIB=1024] [RUNS=3]. Not run by CI.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
size_mib=${1:-1024}
runs=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/ferry
work=$(mktemp -d)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"
fingerprint=$("$bin" keygen --cert "$work/cert.pem" --key "$work/key.pem" 2>/dev/null)
"$bin" token bench --out "$work/bench.token" > "$work/clients.toml"

# push MODE: one fresh push with a fresh server; prints the client's wall seconds.
push() {
  local mode=$1 serve_args=() push_args=()
  case $mode in
    tls) serve_args=(--tls-cert "$work/cert.pem" --tls-key "$work/key.pem"); push_args=(--tls-fingerprint "$fingerprint") ;;
    tls+token) serve_args=(--tls-cert "$work/cert.pem" --tls-key "$work/key.pem" --config "$work/clients.toml")
               push_args=(--tls-fingerprint "$fingerprint" --token-file "$work/bench.token") ;;
  esac
  rm -rf "$work/root" "$work/state"; sync
  "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" "${serve_args[@]}" > "$work/server.out" &
  server_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  local addr start end
  addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
  start=$(date +%s.%N)
  "$bin" push "$work/src.bin" "ferry://$addr/src.bin" --state "$work/state" --json "${push_args[@]}" > "$work/push.json"
  end=$(date +%s.%N)
  kill -INT "$server_pid"; wait "$server_pid" || true
  local dest="$work/root/src.bin"
  [ "$mode" = tls+token ] && dest="$work/root/bench/src.bin"
  cmp "$work/src.bin" "$dest"
  awk -v a="$start" -v b="$end" 'BEGIN{printf "%.3f\n", b-a}'
}

for mode in plain tls tls+token; do : > "$work/$mode"; done
for run in $(seq "$runs"); do
  for mode in plain tls tls+token; do
    t=$(push "$mode"); echo "$t" >> "$work/$mode"; echo "run $run $mode: ${t}s"
  done
done
plain=$(median < "$work/plain")
for mode in plain tls tls+token; do
  m=$(median < "$work/$mode")
  echo "median of $runs, ${size_mib} MiB, $mode: ${m}s ($(awk -v a="$m" -v b="$plain" 'BEGIN{printf "%.2f", a/b}')x plain," \
    "$(awk -v s="$size_mib" -v t="$m" 'BEGIN{printf "%.0f", s/t}') MiB/s)"
done
