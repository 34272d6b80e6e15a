#!/usr/bin/env bash
# ferry beside rsync (daemon on loopback) and a raw TCP copy (socat to a file + sync), on the same files in one run.
# Usage: bench/compare.sh [SIZE_MIB=2048] [RUNS=3] [FILES=10000] [OUT=docs/benchmarks.md]
# Writes a markdown report (medians of RUNS, peak RSS per process) to OUT, its tables as an SVG bar chart beside it
# (bench/chart.py), and prints the report. Not run by CI.
# Needs rsync and socat (installed with apt-get if missing and possible) and /usr/bin/time.
set -euo pipefail
size_mib=${1:-2048}
runs=${2:-3}
files=${3:-10000}
out=${4:-docs/benchmarks.md}
cd "$(dirname "$0")/.."
repo=$PWD

for tool in rsync socat /usr/bin/time; do
  if ! command -v "$tool" > /dev/null; then
    echo "compare: installing $tool" >&2
    apt-get install -y rsync socat time > /dev/null
  fi
done
cargo build --release --quiet
bin=$repo/target/release/ferry
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-compare.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
lo_bytes() { awk '$1 == "lo:" {print $2}' /proc/net/dev; }
rss_kib() { awk -F': ' '/Maximum resident/ {print $2}' "$1"; }
source "$repo/bench/lib.sh"
# server_pid: the ferry server process itself (start_ferry runs it under /usr/bin/time).
server_pid() { pgrep -P "$ferry_pid" -x ferry || echo "$ferry_pid"; }
# first_mib DIR T0 OUT: in the background, writes to OUT the seconds from T0 until the files under DIR first hold
# 1 MiB (the receiver's time to first byte, at a 20 ms resolution); stop it with kill once the run is over.
first_mib() {
  ( for _ in $(seq 30000); do
      held=$(du -sb "$1" 2> /dev/null | awk '{print $1}')
      if [ "${held:-0}" -ge 1048576 ]; then since "$2" > "$3"; exit 0; fi
      sleep 0.02
    done ) &
  watcher=$!
}
# record NAME VALUE: appends a sample for a result.
record() { echo "$2" >> "$work/results/$1"; }
result() { [ -s "$work/results/$1" ] && median < "$work/results/$1" || echo "n/a"; }
mkdir -p "$work/results"

echo "compare: generating a ${size_mib} MiB file and ${files} small files" >&2
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/src.bin"
make_small_tree "$work/tree" "$files"

# --- servers --------------------------------------------------------------------------------------------------
start_ferry() { # start_ferry ROOT [extra args]: starts a fresh ferry server, sets ferry_addr and ferry_pid
  local root=$1; shift
  rm -rf "$root"
  /usr/bin/time -v -o "$work/ferry-server.time" "$bin" -q serve --listen 127.0.0.1:0 --root "$root" "$@" \
    > "$work/ferry.out" 2>> "${FERRY_SERVER_LOG:-/dev/null}" &
  ferry_pid=$!
  pids+=("$ferry_pid")
  for _ in $(seq 1200); do grep -q listening "$work/ferry.out" 2> /dev/null && break; sleep 0.05; done
  ferry_addr=$(sed -n 's/^ferry: listening on //p' "$work/ferry.out" | head -1)
}
stop_ferry() { pkill -INT -P "$ferry_pid" 2> /dev/null || true; wait "$ferry_pid" 2> /dev/null || true; }

start_rsync_daemon

# --- 1. fresh push --------------------------------------------------------------------------------------------
fresh_ferry() {
  start_ferry "$work/ferry-root"
  rm -rf "$work/state"; sync
  local server written t0; server=$(server_pid); written=$(write_bytes "$server")
  t0=$(now)
  first_mib "$work/ferry-root" "$t0" "$work/ttfb"
  if ! /usr/bin/time -v -o "$work/ferry-client.time" "$bin" push "$work/src.bin" "ferry://$ferry_addr/src.bin" \
    --state "$work/state" --json "$@" > "$work/push.json"; then
    echo "compare: the fresh push failed; server at $ferry_addr:" >&2
    cat "$work/ferry.out" "$work/ferry-server.time" >&2 || true
    kill "$watcher" 2> /dev/null || true; wait "$watcher" 2> /dev/null || true
    stop_ferry
    return 0
  fi
  record fresh_ferry "$(since "$t0")"
  kill "$watcher" 2> /dev/null || true; wait "$watcher" 2> /dev/null || true
  [ -s "$work/ttfb" ] && record ttfb_ferry "$(cat "$work/ttfb")"; rm -f "$work/ttfb"
  record disk_fresh_ferry "$(($(write_bytes "$server") - written))"
  stop_ferry
  cmp "$work/src.bin" "$work/ferry-root/src.bin"
  record rss_client "$(rss_kib "$work/ferry-client.time")"
  record rss_server "$(rss_kib "$work/ferry-server.time")"
}
fresh_socat() {
  rm -f "$work/socat.bin"; sync
  local port; port=$(free_port)
  socat -u "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr" "OPEN:$work/socat.bin,creat,trunc" &
  local listener=$!
  sleep 0.2
  local t0; t0=$(now)
  socat -u "OPEN:$work/src.bin" "TCP:127.0.0.1:$port"
  wait "$listener"
  sync
  record fresh_socat "$(since "$t0")"
}
fresh_rsync() { # fresh_rsync NAME [rsync flags]
  local name=$1; shift
  rm -rf "$work/rsync-dst/"*; sync
  local written t0; written=$(write_bytes "$rsync_pid")
  t0=$(now)
  first_mib "$work/rsync-dst" "$t0" "$work/ttfb"
  /usr/bin/time -v -o "$work/rsync.time" rsync -t "$@" "$work/src.bin" "$rsync_url/src.bin"
  record "$name" "$(since "$t0")"
  kill "$watcher" 2> /dev/null || true; wait "$watcher" 2> /dev/null || true
  [ -s "$work/ttfb" ] && record "ttfb_$name" "$(cat "$work/ttfb")"; rm -f "$work/ttfb"
  record "disk_$name" "$(daemon_writes_since "$written")"
  record "rss_$name" "$(rss_kib "$work/rsync.time")"
}
for run in $(seq "$runs"); do
  echo "compare: fresh push, run $run" >&2
  fresh_socat
  fresh_ferry
  fresh_rsync fresh_rsync
  fresh_rsync fresh_rsync_fsync --fsync
done

# --- 2. resume after a kill at 50 % ---------------------------------------------------------------------------
half=$((size_mib * 1024 * 1024 / 2))
wait_for_bytes() { # wait_for_bytes DIR BYTES: until the files under DIR hold BYTES (bounded to 10 minutes)
  for _ in $(seq 12000); do
    local held; held=$(du -sb "$1" 2> /dev/null | awk '{print $1}')
    [ "${held:-0}" -ge "$2" ] && return 0
    sleep 0.05
  done
  return 1
}
for run in $(seq "$runs"); do
  echo "compare: resume at 50 %, run $run" >&2
  start_ferry "$work/ferry-root"
  rm -rf "$work/state"
  "$bin" push "$work/src.bin" "ferry://$ferry_addr/src.bin" --state "$work/state" --json > /dev/null 2>&1 &
  client=$!
  wait_for_bytes "$work/ferry-root/.ferry/partial" "$half"
  kill -9 "$client" 2> /dev/null || true; wait "$client" 2> /dev/null || true
  server=$(server_pid)
  sleep 0.5 # the server makes durable what it has once it sees the client gone
  written=$(write_bytes "$server"); read_before=$(awk '/^rchar/ {print $2}' "/proc/$server/io")
  t0=$(now)
  "$bin" push "$work/src.bin" "ferry://$ferry_addr/src.bin" --state "$work/state" --json > "$work/resume.json"
  record resume_ferry "$(since "$t0")"
  record disk_resume_ferry "$(($(write_bytes "$server") - written))"
  record read_resume_ferry "$(($(awk '/^rchar/ {print $2}' "/proc/$server/io") - read_before))"
  stop_ferry
  cmp "$work/src.bin" "$work/ferry-root/src.bin"

  for mode in partial append; do
    rm -rf "$work/rsync-dst/"*
    rsync -t --partial "$work/src.bin" "$rsync_url/src.bin" > /dev/null 2>&1 &
    client=$!
    wait_for_bytes "$work/rsync-dst" "$half"
    kill -9 "$client" 2> /dev/null || true; wait "$client" 2> /dev/null || true
    sleep 0.5 # the daemon keeps the partial file under the final name once it sees the client gone
    flags=(--partial)
    [ "$mode" = append ] && flags+=(--append-verify)
    t0=$(now)
    rsync -t "${flags[@]}" "$work/src.bin" "$rsync_url/src.bin"
    record "resume_rsync_$mode" "$(since "$t0")"
    cmp "$work/src.bin" "$work/rsync-dst/src.bin"
  done
done

# --- 3. unchanged re-push, 4. delta ---------------------------------------------------------------------------
edit_middle() { python3 - "$1" << 'EOF'
import os, sys
with open(sys.argv[1], "r+b") as f:
    size = os.fstat(f.fileno()).st_size
    f.seek(size // 2)
    f.write(os.urandom(1 << 20))
EOF
}
insert_near_start() { python3 - "$1" << 'EOF'
import os, sys
path = sys.argv[1]
with open(path, "rb") as f:
    head = f.read(4096)
    rest = f.read()
with open(path + ".new", "wb") as f:
    f.write(head + os.urandom(100) + rest)
os.replace(path + ".new", path)
EOF
}
for run in $(seq "$runs"); do
  echo "compare: re-push and delta, run $run" >&2
  cp "$work/src.bin" "$work/edit.bin"
  start_ferry "$work/ferry-root"
  rm -rf "$work/state" "$work/rsync-dst/"*
  "$bin" push "$work/edit.bin" "ferry://$ferry_addr/edit.bin" --state "$work/state" --json > /dev/null
  rsync -t "$work/edit.bin" "$rsync_url/edit.bin"
  t0=$(now)
  "$bin" push "$work/edit.bin" "ferry://$ferry_addr/edit.bin" --state "$work/state" --json > /dev/null
  record noop_ferry "$(since "$t0")"
  t0=$(now)
  rsync -t "$work/edit.bin" "$rsync_url/edit.bin"
  record noop_rsync "$(since "$t0")"
  for edit in middle insert; do
    if [ "$edit" = middle ]; then edited "$work/edit.bin" edit_middle "$work/edit.bin"; else edited "$work/edit.bin" insert_near_start "$work/edit.bin"; fi
    server=$(server_pid); written=$(write_bytes "$server")
    before=$(lo_bytes); t0=$(now)
    "$bin" push "$work/edit.bin" "ferry://$ferry_addr/edit.bin" --state "$work/state" --json > /dev/null
    record "delta_${edit}_ferry" "$(since "$t0")"
    record "wire_${edit}_ferry" "$(($(lo_bytes) - before))"
    record "disk_${edit}_ferry" "$(($(write_bytes "$server") - written))"
    written=$(write_bytes "$rsync_pid")
    before=$(lo_bytes); t0=$(now)
    rsync -t "$work/edit.bin" "$rsync_url/edit.bin"
    record "delta_${edit}_rsync" "$(since "$t0")"
    record "wire_${edit}_rsync" "$(($(lo_bytes) - before))"
    record "disk_${edit}_rsync" "$(daemon_writes_since "$written")"
    cmp "$work/edit.bin" "$work/ferry-root/edit.bin"
    cmp "$work/edit.bin" "$work/rsync-dst/edit.bin"
  done
  stop_ferry
done

# --- 5. a tree of small files ---------------------------------------------------------------------------------
# Every run writes into directories that did not hold files before, and nothing is deleted until the end: ext4
# scans past inodes freed in the last half minute when it allocates new ones nearby, which made creating 10,000
# files right after deleting 10,000 take 3-4x longer (perf: __ext4_new_inode -> recently_deleted), for any tool.
for run in $(seq "$runs"); do
  echo "compare: tree of $files files, run $run" >&2
  start_ferry "$work/tree-ferry-$run"
  rm -rf "$work/state"; sync
  server=$(server_pid); written=$(write_bytes "$server")
  t0=$(now)
  "$bin" push "$work/tree" "ferry://$ferry_addr/tree" --state "$work/state" --json > /dev/null
  record tree_fresh_ferry "$(since "$t0")"
  record disk_tree_ferry "$(($(write_bytes "$server") - written))"
  t0=$(now)
  "$bin" push "$work/tree" "ferry://$ferry_addr/tree" --state "$work/state" --json > /dev/null
  record tree_noop_ferry "$(since "$t0")"
  stop_ferry
  diff -r "$work/tree" "$work/tree-ferry-$run/tree" > /dev/null
  sync
  t0=$(now)
  rsync -a "$work/tree/" "$rsync_url/tree-$run/"
  record tree_fresh_rsync "$(since "$t0")"
  t0=$(now)
  rsync -a "$work/tree/" "$rsync_url/tree-$run/"
  record tree_noop_rsync "$(since "$t0")"
  # The same copy made durable, as ferry's is before it answers: rsync -a, then sync.
  sync
  written=$(write_bytes "$rsync_pid")
  t0=$(now)
  rsync -a "$work/tree/" "$rsync_url/tree-sync-$run/"
  sync
  record tree_fresh_rsync_sync "$(since "$t0")"
  record disk_tree_rsync "$(daemon_writes_since "$written")"
done

# --- 6. a link with latency (40 ms round trip) ----------------------------------------------------------------
lat_mib=$((size_mib < 512 ? size_mib : 512))
head -c "$((lat_mib * 1024 * 1024))" "$work/src.bin" > "$work/lat.bin"
cargo build --release --quiet --example delay_proxy
for run in $(seq "$runs"); do
  echo "compare: ${lat_mib} MiB over a 40 ms round trip, run $run" >&2
  for setting in 1:default 1:16MiB 4:16MiB 1:64MiB 1:4MiB 4:4MiB; do
    streams=${setting%%:*}
    window=${setting#*:}
    flags=(--streams "$streams")
    [ "$window" = default ] || flags+=(--window "$window")
    start_ferry "$work/ferry-root"
    start_proxy "$ferry_addr"
    rm -rf "$work/state"
    t0=$(now)
    # A failed setting is reported as n/a instead of losing the whole report.
    if "$bin" push "$work/lat.bin" "ferry://$proxy_addr/lat.bin" --state "$work/state" "${flags[@]}" --json > /dev/null; then
      record "lat_ferry_${streams}_$window" "$(since "$t0")"
    else
      echo "compare: the push with $setting failed (server ${ferry_addr:-not started}, proxy ${proxy_addr:-not started})" >&2
    fi
    kill "$proxy_pid" 2> /dev/null || true; wait "$proxy_pid" 2> /dev/null || true
    stop_ferry
    [ ! -e "$work/ferry-root/lat.bin" ] || cmp "$work/lat.bin" "$work/ferry-root/lat.bin"
  done
  rm -rf "$work/rsync-dst/"*
  start_proxy "127.0.0.1:$rsync_port"
  t0=$(now)
  rsync -t "$work/lat.bin" "rsync://$proxy_addr/dst/lat.bin"
  record lat_rsync "$(since "$t0")"
  kill "$proxy_pid"; wait "$proxy_pid" 2> /dev/null || true
done

# --- report ---------------------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0 && a != "n/a") printf "%.2f", a/b; else print "n/a" }'; }
mib() { if [ "$1" = n/a ]; then echo n/a; else awk -v b="$1" 'BEGIN{printf "%.2f MiB", b/1048576}'; fi; }
fresh=$(result fresh_ferry)
{
  echo "# Benchmarks"
  echo
  echo "Produced by \`bench/compare.sh $size_mib $runs $files\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM,"
  echo "$(uname -sr), $("$bin" --version), $(rsync --version | head -1 | cut -d' ' -f1-4), $(socat -V 2> /dev/null | awk '/socat version/ {print "socat " $3}' | head -1)."
  echo "Everything runs over loopback on one machine (client and server share the 2 cores); times are wall-clock"
  echo "medians of $runs runs, taken in one run of the script, interleaved, so the ratios compare like with like."
  echo
  echo "![The tables below as bars (bench/chart.py)]($(basename "${out%.md}").svg)"
  echo
  echo "## Fresh push of a ${size_mib} MiB random file"
  echo
  echo "Receiver writes: bytes the receiving process caused to be written to storage (\`/proc/PID/io\` write_bytes of"
  echo "the ferry server or the rsync daemon, its reaped children included). First MiB: seconds until the receiver's"
  echo "directory first held 1 MiB (polled every 20 ms)."
  echo
  echo "| tool | time (s) | vs socat+sync | receiver writes | first MiB (s) | peak RSS |"
  echo "|---|---|---|---|---|---|"
  echo "| socat to a file + sync (the disk limit) | $(result fresh_socat) | 1.00 | | | |"
  echo "| ferry (fsync before commit) | $fresh | $(ratio "$fresh" "$(result fresh_socat)") | $(mib "$(result disk_fresh_ferry)") | $(result ttfb_ferry) | client $(result rss_client) KiB, server $(result rss_server) KiB |"
  echo "| rsync | $(result fresh_rsync) | $(ratio "$(result fresh_rsync)" "$(result fresh_socat)") | $(mib "$(result disk_fresh_rsync)") | $(result ttfb_fresh_rsync) | client $(result rss_fresh_rsync) KiB |"
  echo "| rsync --fsync | $(result fresh_rsync_fsync) | $(ratio "$(result fresh_rsync_fsync)" "$(result fresh_socat)") | $(mib "$(result disk_fresh_rsync_fsync)") | $(result ttfb_fresh_rsync_fsync) | client $(result rss_fresh_rsync_fsync) KiB |"
  echo
  echo "ferry / rsync --fsync: $(ratio "$fresh" "$(result fresh_rsync_fsync)")."
  echo
  echo "## Resume after the transfer was killed at 50 %"
  echo
  echo "ferry's server during the resume: $(mib "$(result disk_resume_ferry)") written, $(mib "$(result read_resume_ferry)") read (\`rchar\`)."
  echo "ferry / rsync --partial --append-verify: $(ratio "$(result resume_ferry)" "$(result resume_rsync_append)")."
  echo
  echo "| tool | time (s) | vs ferry fresh |"
  echo "|---|---|---|"
  echo "| ferry | $(result resume_ferry) | $(ratio "$(result resume_ferry)" "$fresh") |"
  echo "| rsync --partial | $(result resume_rsync_partial) | $(ratio "$(result resume_rsync_partial)" "$fresh") |"
  echo "| rsync --partial --append-verify | $(result resume_rsync_append) | $(ratio "$(result resume_rsync_append)" "$fresh") |"
  echo
  echo "## Re-push of an unchanged file (the nightly no-op)"
  echo
  echo "| tool | time (s) |"
  echo "|---|---|"
  echo "| ferry | $(result noop_ferry) |"
  echo "| rsync | $(result noop_rsync) |"
  echo
  echo "## Delta"
  echo
  echo "Bytes on the wire are loopback bytes in both directions (\`/proc/net/dev\`), protocol overhead included."
  echo "Receiver writes are \`/proc/PID/io\` write_bytes of the ferry server or the rsync daemon during the re-push, as above."
  echo
  echo "| edit | ferry time (s) | ferry on the wire | ferry receiver writes | rsync time (s) | rsync on the wire | rsync receiver writes |"
  echo "|---|---|---|---|---|---|---|"
  for edit in middle insert; do
    if [ "$edit" = middle ]; then what="1 MiB changed mid-file"; else what="100 bytes inserted near the start"; fi
    echo "| $what | $(result "delta_${edit}_ferry") | $(mib "$(result "wire_${edit}_ferry")") | $(mib "$(result "disk_${edit}_ferry")") | $(result "delta_${edit}_rsync") | $(mib "$(result "wire_${edit}_rsync")") | $(mib "$(result "disk_${edit}_rsync")") |"
  done
  echo
  echo "## A tree of $files files of 4–64 KiB"
  echo
  echo "| tool | fresh (s) | no-op (s) | receiver writes (fresh) |"
  echo "|---|---|---|---|"
  echo "| ferry | $(result tree_fresh_ferry) | $(result tree_noop_ferry) | $(mib "$(result disk_tree_ferry)") |"
  echo "| rsync -a | $(result tree_fresh_rsync) | $(result tree_noop_rsync) | |"
  echo "| rsync -a, then sync (durable like ferry) | $(result tree_fresh_rsync_sync) | | $(mib "$(result disk_tree_rsync)") |"
  echo
  echo "ferry / (rsync -a, then sync), fresh: $(ratio "$(result tree_fresh_ferry)" "$(result tree_fresh_rsync_sync)"); no-op, ferry / rsync: $(ratio "$(result tree_noop_ferry)" "$(result tree_noop_rsync)")."
  echo
  echo "## A ${lat_mib} MiB push over a link with 40 ms round trip"
  echo
  echo "Through ferry's delaying proxy (\`examples/delay_proxy.rs\`, 20 ms each way) on loopback."
  echo
  echo "| tool | time (s) | MiB/s |"
  echo "|---|---|---|"
  for setting in 1:default 1:16MiB 4:16MiB 1:64MiB 1:4MiB 4:4MiB; do
    streams=${setting%%:*}
    window=${setting#*:}
    t=$(result "lat_ferry_${streams}_$window")
    label="--streams $streams, --window $window"
    [ "$window" = default ] && label="default flags (window sized from the bandwidth-delay product)"
    echo "| ferry, $label | $t | $(awk -v s="$lat_mib" -v t="$t" 'BEGIN{printf "%.0f", s/t}') |"
  done
  t=$(result lat_rsync)
  echo "| rsync | $t | $(awk -v s="$lat_mib" -v t="$t" 'BEGIN{printf "%.0f", s/t}') |"
  echo
  echo "ferry with default flags / rsync: $(ratio "$(result lat_ferry_1_default)" "$t")."
  echo
  echo "## Every round"
  echo
  echo "The values behind each median above, in the order the rounds ran (seconds, bytes or KiB as recorded), so a"
  echo "median that moves between runs of the script can be traced to its rounds."
  echo
  echo '```'
  for file in "$work/results"/*; do
    echo "$(basename "$file"): $(tr '\n' ' ' < "$file")"
  done
  echo '```'

} > "$work/report.md"
mkdir -p "$(dirname "$out")"
# Hand-written notes below the marker line of an existing report (figures of other scripts, earlier runs) are kept.
marker='<!-- Below: notes kept by bench/compare.sh when it rewrites the report above. -->'
if [ -f "$out" ] && grep -qxF "$marker" "$out"; then
  { echo; awk -v m="$marker" 'kept || $0 == m { kept = 1; print }' "$out"; } >> "$work/report.md"
fi
cp "$work/report.md" "$out"
python3 bench/chart.py "$out" "${out%.md}.svg"
cat "$out"
