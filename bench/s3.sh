#!/usr/bin/env bash
# ferry through one `ferry serve --store s3://…` server beside `rclone copy` straight to the bucket, on one 3-node
# Garage cluster (tests/garage/cluster.sh) in one run (issue 15, docs/object-store.md "Benchmark").
# Usage: bench/s3.sh [SIZE_MIB=1024] [RUNS=3] [OUT]      (BENCH_TOOLS="ferry rclone" by default; one of them to
#                                                       measure only that side)
#        FERRY_BASE=/path/to/an/older/ferry bench/s3.sh …  also measures that binary (server and client) as "base",
#                                                       in the same run on the same cluster: before/after figures
# Scenarios, each tool on its own fresh prefix per run:
#   fresh       the file to an empty prefix
#   resume      a fresh push SIGKILLed once the client has written half the file's size to its sockets, then
#               rerun: the rerun is measured (rclone starts the object over; ferry resumes)
#   unchanged   the same file again
#   1MiB        1 MiB in the middle of the file changed, then pushed again
# Reports per scenario the median of RUNS: wall time, bytes the client wrote (wchar of /proc/PID/io, read while the
# exited client is still unreaped: its sockets plus any local state it writes), ferry's payload `bytes_sent`, and
# bytes stored under the tool's prefix after the scenario (sum of LIST sizes). Prints a markdown report (and
# writes it to OUT if given). Needs GARAGE (or .ci/garage.sh), rclone, python3. Not run by CI.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
size_mib=${1:-1024}
runs=${2:-3}
out=${3:-}
tools=${BENCH_TOOLS:-ferry rclone}
base_bin=${FERRY_BASE:-}
if [ -n "$base_bin" ]; then
  [ -x "$base_bin" ] || { echo "s3.sh: FERRY_BASE=$base_bin is not an executable" >&2; exit 1; }
  tools="base $tools"
fi
cd "$(dirname "$0")/.."
repo=$PWD

command -v rclone > /dev/null || { echo "s3.sh: rclone is missing (apt-get install -y rclone)" >&2; exit 1; }
GARAGE="$(bash .ci/garage.sh)"
export GARAGE
bin=$repo/target/release/ferry
if [[ " $tools " == *" ferry "* ]]; then
  cargo build --release --quiet
  if ! "$bin" serve --help | grep -q -- '--store'; then
    echo "s3.sh: this ferry has no 'serve --store' (the object-store backend of issue 15): nothing to measure" >&2
    exit 1
  fi
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-s3bench.XXXXXX")
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2> /dev/null || true; fi
  bash tests/garage/cluster.sh stop "$work/garage" > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "s3.sh: starting the Garage cluster" >&2
bash tests/garage/cluster.sh start "$work/garage" > "$work/garage.env"
# shellcheck disable=SC1091
source "$work/garage.env"
export RCLONE_CONFIG_G_TYPE=s3 RCLONE_CONFIG_G_PROVIDER=Other RCLONE_CONFIG_G_ENDPOINT=$AWS_ENDPOINT_URL \
  RCLONE_CONFIG_G_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID RCLONE_CONFIG_G_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY \
  RCLONE_CONFIG_G_REGION=garage RCLONE_CONFIG_G_FORCE_PATH_STYLE=true

# measure.py OUT KILL_AT CMD...: runs CMD; with KILL_AT > 0, SIGKILLs it once its wchar reaches KILL_AT, or, with
# PROGRESS set to a ferry client's STATE/running.json, once the bytes it reports acknowledged (`done`) do: ferry
# writes to its sockets with send(2), which wchar does not count. Writes "SECONDS WCHAR EXIT" to OUT, wchar read
# from /proc while the exited child is a zombie (nothing is missed).
cat > "$work/measure.py" << 'EOF'
import os, signal, subprocess, sys, time
out, kill_at, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def wchar(pid):
    with open(f"/proc/{pid}/io") as f:
        return int(next(l for l in f if l.startswith("wchar:")).split()[1])
def progress():
    try:
        import json
        with open(os.environ["PROGRESS"]) as f:
            return int(json.load(f).get("done", 0))
    except (KeyError, OSError, ValueError):
        return 0
t0 = time.monotonic()
child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(out + ".stdout", "wb"), stderr=open(out + ".stderr", "wb"))
deadline = t0 + 3600
while kill_at > 0 and time.monotonic() < deadline:
    if os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
        break
    if max(wchar(child.pid), progress()) >= kill_at:
        child.send_signal(signal.SIGKILL)
        break
    time.sleep(0.01)
os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
secs, written = time.monotonic() - t0, wchar(child.pid)
code = child.wait()
open(out, "w").write(f"{secs:.3f} {written} {code}\n")
EOF

mkdir -p "$work/results"
record() { echo "$2" >> "$work/results/$1"; }
result() { [ -s "$work/results/$1" ] && median < "$work/results/$1" || echo "n/a"; }
stored() { python3 tests/garage/s3.py du "$GARAGE_BUCKET" "$1" | awk '{print $2}'; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# binary_of TOOL: the ferry binary of TOOL (ferry: this tree's release build; base: FERRY_BASE)
binary_of() { if [ "$1" = base ]; then echo "$base_bin"; else echo "$bin"; fi; }
# serve_on TOOL PREFIX: (re)starts the one ferry server (TOOL's binary), on s3://BUCKET/PREFIX/ with a fresh --state
serve_on() {
  if [ -n "$server_pid" ]; then kill "$server_pid"; wait "$server_pid" 2> /dev/null || true; fi
  rm -rf "$work/server-state" "$work/server.out"
  local prefix=$2
  "$(binary_of "$1")" serve --listen "127.0.0.1:$port" --store "s3://$GARAGE_BUCKET/$prefix/" --state "$work/server-state" \
    > "$work/server.out" 2>> "$work/server.log" &
  server_pid=$!
  for _ in $(seq 300); do grep -q "listening on" "$work/server.out" 2> /dev/null && break; sleep 0.1; done
  grep -q "listening on" "$work/server.out" || { echo "s3.sh: the ferry server did not start" >&2; tail "$work/server.log" >&2; exit 1; }
}

half=$((size_mib * 1024 * 1024 / 2))
# tool_run TOOL SCENARIO RUN FILE KILL_AT: one push by TOOL of FILE to the prefix of RUN (for ferry: the one its
# server stores under, see serve_on); records a sample unless the push is to be killed.
tool_run() {
  local tool=$1 scenario=$2 run=$3 file=$4 kill_at=$5 m="$work/m.$1.$2.$3" prefix
  if [ "$tool" != rclone ]; then
    prefix="bench-$tool-$run/"
    PROGRESS="$work/client-state-$tool-$run/running.json" python3 "$work/measure.py" "$m" "$kill_at" "$(binary_of "$tool")" push "$file" \
      "ferry://127.0.0.1:$port/big.bin" --state "$work/client-state-$tool-$run" --json -q
  else
    prefix="bench-rclone-$run/"
    python3 "$work/measure.py" "$m" "$kill_at" env -u AWS_CA_BUNDLE rclone copy "$file" "G:$GARAGE_BUCKET/$prefix"
  fi
  [ "$kill_at" -gt 0 ] && return 0
  read -r secs written code < "$m"
  [ "$code" = 0 ] || { echo "s3.sh: $tool $scenario failed ($code):" >&2; cat "$m.stderr" "$m.stdout" >&2; exit 1; }
  record "$tool.$scenario.secs" "$secs"
  record "$tool.$scenario.written" "$written"
  record "$tool.$scenario.stored" "$(stored "$prefix")"
  if [ "$tool" != rclone ]; then
    record "$tool.$scenario.payload" "$(tail -n 1 "$m.stdout" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_sent"])')"
  fi
}

echo "s3.sh: a ${size_mib} MiB file, $runs run(s)" >&2
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/big.bin"
mkdir -p "$work/resume"
for run in $(seq "$runs"); do
  for tool in $tools; do
    # resume first, on its own prefix (run number + 1000) and client state
    cp "$work/big.bin" "$work/resume/big.bin"
    [ "$tool" != rclone ] && serve_on "$tool" "bench-$tool-$((run + 1000))"
    tool_run "$tool" resume-cut "$((run + 1000))" "$work/resume/big.bin" "$half"
    tool_run "$tool" resume "$((run + 1000))" "$work/resume/big.bin" 0
    [ "$tool" != rclone ] && serve_on "$tool" "bench-$tool-$run"
    mkdir -p "$work/src$run.$tool"
    cp "$work/big.bin" "$work/src$run.$tool/big.bin"
    tool_run "$tool" fresh "$run" "$work/src$run.$tool/big.bin" 0
    tool_run "$tool" unchanged "$run" "$work/src$run.$tool/big.bin" 0
    head -c 1048576 /dev/urandom | dd of="$work/src$run.$tool/big.bin" bs=1M seek="$((size_mib / 2))" conv=notrunc status=none
    tool_run "$tool" 1MiB "$run" "$work/src$run.$tool/big.bin" 0
  done
done

mib() { if [ "$1" = n/a ]; then echo n/a; else awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0 && a != "n/a") printf "%.2f", a/b; else print "n/a" }'; }
{
  echo "## ferry on Garage vs rclone (bench/s3.sh)"
  echo
  echo "Produced by \`bench/s3.sh $size_mib $runs\` on $(date -u +%Y-%m-%d), $(nproc) cores: one 3-node Garage $("$GARAGE" --version | head -n 1 | awk '{print $2}') cluster on"
  echo "loopback (replication 3), a ${size_mib} MiB random file, medians of $runs run(s). ferry: one \`ferry serve --store\`"
  echo "server, client on loopback; rclone $(rclone version | head -n 1 | awk '{print $2}'): \`rclone copy\` to the bucket. \"client wrote\" is"
  echo "the client's wchar (for rclone its sockets and local state; ferry sends with send(2), which wchar does not count,"
  echo "so its \"payload\" column is what it sent), \"stored\" the sum of LIST sizes under the tool's prefix after the step."
  echo
  echo "| step | ferry time (s) | rclone time (s) | ferry/rclone | ferry wrote (MiB) | ferry payload (MiB) | rclone wrote (MiB) | ferry stored (MiB) | rclone stored (MiB) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for s in fresh resume unchanged 1MiB; do
    ft=$(result "ferry.$s.secs"); rt=$(result "rclone.$s.secs")
    echo "| $s | $ft | $rt | $(ratio "$ft" "$rt") | $(mib "$(result "ferry.$s.written")") | $(mib "$(result "ferry.$s.payload")") | $(mib "$(result "rclone.$s.written")") | $(mib "$(result "ferry.$s.stored")") | $(mib "$(result "rclone.$s.stored")") |"
  done
  echo
  if [ -n "$base_bin" ]; then
    echo
    echo "The same steps with FERRY_BASE ($("$base_bin" --version | head -n 1)) in the same run, against this tree's build:"
    echo
    echo "| step | base time (s) | ferry time (s) | ferry/base | base/rclone | base payload (MiB) | base stored (MiB) |"
    echo "|---|---|---|---|---|---|---|"
    for s in fresh resume unchanged 1MiB; do
      bt=$(result "base.$s.secs"); ft=$(result "ferry.$s.secs"); rt=$(result "rclone.$s.secs")
      echo "| $s | $bt | $ft | $(ratio "$ft" "$bt") | $(ratio "$bt" "$rt") | $(mib "$(result "base.$s.payload")") | $(mib "$(result "base.$s.stored")") |"
    done
    echo
  fi
  echo "\"resume\" is the rerun after a SIGKILL once the client had written half the file's size; rclone starts"
  echo "the object over, ferry sends what the bucket lacks."
} > "$work/report.md"
cat "$work/report.md"
[ -z "$out" ] || cp "$work/report.md" "$out"
