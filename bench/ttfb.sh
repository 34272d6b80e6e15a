#!/usr/bin/env bash
# Time to first chunk and total time of a fresh loopback push, two builds side by side (issue 14, item 1: the
# streamed manifest). Time to first chunk is measured on the receiver: from the client's start until the server's
# partial file under .ferry/partial first holds a byte (polled every 2 ms). Also reports peak RSS of client and
# server (/usr/bin/time -v).
# Usage: bench/ttfb.sh A_BIN B_BIN [SIZE_MIB=2048] [RUNS=3]
# Runs alternate A and B on the same random file, each against its own server; prints per-run figures and medians.
# Not run by CI: it writes SIZE_MIB * 2 MiB to a temp dir (under $TMPDIR).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
a_bin=$1
b_bin=$2
size_mib=${3:-2048}
runs=${4:-3}
work=$(mktemp -d)
server_pid=
trap '[ -n "$server_pid" ] && kill "$(pgrep -P "$server_pid")" 2>/dev/null; rm -rf "$work"' EXIT
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"

field() { awk -F': ' -v k="$1" '$1 ~ k {print $2}' "$2"; }

# push_once BIN: starts a fresh server, pushes, prints "ttfb_s total_s client_rss_kib server_rss_kib".
push_once() {
  local bin=$1
  rm -rf "$work/root" "$work/state"; sync
  /usr/bin/time -v -o "$work/server.time" "$bin" -q serve --listen 127.0.0.1:0 --root "$work/root" \
    > "$work/server.out" &
  server_pid=$!
  for _ in $(seq 600); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  local addr; addr=$(sed -n 's/^ferry: listening on //p' "$work/server.out")
  [ -n "$addr" ] || { echo "the server did not start" >&2; exit 1; }
  python3 - "$bin" "$work" "$addr" <<'EOF'
import os, subprocess, sys, time
bin, work, addr = sys.argv[1:4]
partial = os.path.join(work, "root", ".ferry", "partial")
def held():
    total = 0
    for base, _, files in os.walk(partial):
        for name in files:
            try:
                total += os.stat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total
t0 = time.monotonic()
client = subprocess.Popen(["/usr/bin/time", "-v", "-o", os.path.join(work, "client.time"), bin, "push",
                           os.path.join(work, "src.bin"), "ferry://%s/src.bin" % addr,
                           "--state", os.path.join(work, "state"), "--json"], stdout=subprocess.DEVNULL)
first = None
while client.poll() is None:
    if first is None and held() > 0:
        first = time.monotonic() - t0
    time.sleep(0.002)
total = time.monotonic() - t0
if client.returncode != 0:
    sys.exit("push failed")
print("%.3f %.3f" % (first if first is not None else total, total))
EOF
  # The server runs under /usr/bin/time, which ignores SIGINT: signal its child (by parent pid).
  kill -INT "$(pgrep -P "$server_pid")"; wait "$server_pid" || true
  server_pid=
  cmp "$work/src.bin" "$work/root/src.bin"
}

: > "$work/results"
for run in $(seq "$runs"); do
  for side in A B; do
    if [ "$side" = A ]; then bin=$a_bin; else bin=$b_bin; fi
    times=$(push_once "$bin")
    line="$side $times $(field "Maximum resident" "$work/client.time") $(field "Maximum resident" "$work/server.time")"
    echo "$line" >> "$work/results"
    echo "run $run $side: time to first chunk $(echo "$times" | cut -d' ' -f1)s, total $(echo "$times" | cut -d' ' -f2)s," \
      "client RSS $(echo "$line" | cut -d' ' -f4) KiB, server RSS $(echo "$line" | cut -d' ' -f5) KiB"
  done
done
for side in A B; do
  col() { awk -v s="$side" -v c="$1" '$1 == s {print $c}' "$work/results" | median; }
  echo "median of $runs, ${size_mib} MiB, $side: time to first chunk $(col 2)s, total $(col 3)s," \
    "client peak RSS $(col 4) KiB, server peak RSS $(col 5) KiB"
done
