#!/usr/bin/env bash
# A 3-node Garage cluster on 127.0.0.1 for ferry's object-store tests (issue 15).
#
#   cluster.sh start DIR        start 3 nodes (replication factor 3), a key and a bucket; write DIR/env
#   cluster.sh stop DIR         stop every node of DIR by its pid (SIGTERM, then SIGKILL after 10 s)
#   cluster.sh kill DIR N       SIGKILL node N (1..3), as a crash would
#   cluster.sh start-node DIR N start node N again on its old ports and data (after kill)
#   cluster.sh env DIR          print DIR/env
#   cluster.sh watch DIR PID    wait (in the background) until process PID is gone, then stop the cluster
#                               and remove DIR: a test binary's guard, which no exit path of it can skip
#
# DIR/env is a shell file to `source` (KEY=VALUE lines, `export`ed): AWS_ENDPOINT_URL (node 1's S3
# API), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_DEFAULT_REGION, AWS_ALLOW_HTTP,
# GARAGE_BUCKET, GARAGE_S3_ENDPOINTS (every node's S3 API, space-separated) and GARAGE_DIR.
# `start` prints the same lines on standard output and nothing else there (logs are in
# DIR/nodeN/log). Ports are picked free at start (two per node: RPC and S3), so parallel clusters
# do not collide; everything listens on 127.0.0.1 only. Every wait is bounded; a start that fails
# stops what it started and exits non-zero with the logs' tails on standard error.
#
# The binary: $GARAGE if set, else `garage` on PATH, else ~/.cargo/bin/garage (.ci/garage.sh
# installs it). Needs python3 (standard library only) for ports, JSON and the S3 probe.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
NODES=3
BUCKET=ferry
KEY_NAME=ferry-test
REGION=garage
START_ATTEMPTS=3       # fresh ports each attempt (another process may take a port we picked)
NODE_BOOT_SECS=90      # per node, on a loaded 2-core machine
CLUSTER_SECS=120       # layout applied and every partition healthy
STOP_SECS=10

die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

garage_bin() {
  if [[ -n "${GARAGE:-}" ]]; then echo "$GARAGE"; return; fi
  if command -v garage >/dev/null 2>&1; then command -v garage; return; fi
  if [[ -x "$HOME/.cargo/bin/garage" ]]; then echo "$HOME/.cargo/bin/garage"; return; fi
  die "no garage binary: set GARAGE, put garage on PATH, or run .ci/garage.sh"
}

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

# gc N ARGS...: the garage CLI against node N's config
gc() { local n=$1; shift; "$GB" -c "$D/node$n/garage.toml" "$@"; }

# alive PIDFILE: true if the pid in PIDFILE runs a garage server of this cluster's config
alive() {
  local pidfile=$1 pid
  [[ -s "$pidfile" ]] || return 1
  pid=$(cat "$pidfile")
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  # the pid may have been reused: require our config path in its command line
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$(dirname "$pidfile")/garage.toml"
}

# free_ports N: N distinct ports free on 127.0.0.1 now, taken BELOW the kernel's ephemeral range when there is
# room: a node killed and started again must get its old ports back, and a port in the ephemeral range may have
# been taken meanwhile as the source port of any outgoing connection on the machine (ferry's, the other nodes')
free_ports() {
  python3 - "$1" <<'EOF'
import random, socket, sys
want = int(sys.argv[1])
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
socks = []
def take(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return False
    socks.append(s)
    return True
if low > 11000:
    for port in random.sample(range(10000, low), min(low - 10000, 50 * want)):
        if len(socks) == want:
            break
        take(port)
while len(socks) < want:
    take(0)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_config() {
  local n=$1 rpc=$2 s3=$3 secret=$4 nd="$D/node$1"
  mkdir -p "$nd/meta" "$nd/data"
  cat >"$nd/garage.toml" <<EOF
# node $n of the ferry test cluster in $D (written by tests/garage/cluster.sh)
metadata_dir = "$nd/meta"
data_dir = "$nd/data"
db_engine = "lmdb"
replication_factor = $NODES
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
EOF
  echo "$s3" >"$nd/s3_port"
}

start_node() {
  local n=$1 nd="$D/node$1"
  # stdin, stdout and stderr away from the caller: a test that captures this script's output must
  # not wait for the daemons to close its pipe
  RUST_LOG=${GARAGE_LOG:-warn} "$GB" -c "$nd/garage.toml" server </dev/null >>"$nd/log" 2>&1 &
  echo $! >"$nd/pid"
}

# wait_node N: its key file exists and the CLI reaches it
wait_node() {
  local n=$1 nd="$D/node$1" deadline=$((SECONDS + NODE_BOOT_SECS))
  while ((SECONDS < deadline)); do
    alive "$nd/pid" || return 1
    if [[ -s "$nd/meta/node_key" ]] && gc "$n" status >/dev/null 2>&1; then return 0; fi
    sleep 0.3
  done
  return 1
}

# retry SECS CMD...: run CMD until it succeeds, at most SECS seconds
retry() {
  local secs=$1 deadline; shift
  deadline=$((SECONDS + secs))
  while true; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    ((SECONDS < deadline)) || { "$@" >&2 || true; return 1; }
    sleep 0.5
  done
}

# healthy: every node up and every partition fully replicated (`garage health` says HEALTHY)
healthy() { gc 1 health 2>/dev/null | grep -qiE '^cluster health:[[:space:]]+healthy'; }

s3_probe() {
  local f="$D/.probe"
  echo "probe $$" >"$f"
  python3 "$HERE/s3.py" put "$BUCKET" .cluster-probe "$f" &&
    python3 "$HERE/s3.py" get "$BUCKET" .cluster-probe | cmp -s - "$f" &&
    python3 "$HERE/s3.py" delete "$BUCKET" .cluster-probe
}

stop_all() {
  local n pids=() pid deadline
  for n in $(seq 1 "$NODES"); do
    if alive "$D/node$n/pid"; then
      pid=$(cat "$D/node$n/pid")
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$n")
    fi
  done
  deadline=$((SECONDS + STOP_SECS))
  for n in "${pids[@]}"; do
    while alive "$D/node$n/pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$D/node$n/pid"; then
      log "node $n did not stop within ${STOP_SECS}s: SIGKILL"
      kill -KILL "$(cat "$D/node$n/pid")" 2>/dev/null || true
    fi
  done
  for n in $(seq 1 "$NODES"); do rm -f "$D/node$n/pid"; done
}

fail_start() {
  log "$1"
  local n
  for n in $(seq 1 "$NODES"); do
    [[ -f "$D/node$n/log" ]] && { echo "--- node $n log (tail)" >&2; tail -n 15 "$D/node$n/log" >&2; }
  done
  stop_all
  exit 1
}

# boot_nodes: one attempt with fresh ports; false if a node died or never answered
boot_nodes() {
  local ports secret n
  read -r -a ports <<<"$(free_ports $((2 * NODES)))"
  secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
  for n in $(seq 1 "$NODES"); do
    rm -rf "$D/node$n"
    write_config "$n" "${ports[$((2 * n - 2))]}" "${ports[$((2 * n - 1))]}" "$secret"
    start_node "$n"
  done
  for n in $(seq 1 "$NODES"); do
    wait_node "$n" || { log "node $n did not come up (attempt log: $D/node$n/log)"; return 1; }
  done
}

cmd_start() {
  local n attempt ids=() id key_json
  for n in $(seq 1 "$NODES"); do
    alive "$D/node$n/pid" && die "a cluster already runs in $D (stop it first)"
  done
  # while this start runs, a guard (`watch`) waits for it before stopping the nodes
  echo "$$ $(start_time $$)" >"$D/start.pid"
  trap 'rm -f "$D/start.pid"' EXIT
  for attempt in $(seq 1 "$START_ATTEMPTS"); do
    boot_nodes && break
    ((attempt < START_ATTEMPTS)) || fail_start "the nodes did not start in $START_ATTEMPTS attempts"
    stop_all
  done

  for n in $(seq 1 "$NODES"); do
    id=$(gc "$n" node id -q 2>/dev/null) || fail_start "node id of node $n"
    ids+=("$id")
  done
  for n in $(seq 2 "$NODES"); do
    retry 30 gc 1 node connect "${ids[$((n - 1))]}" || fail_start "node connect $n"
  done
  for n in $(seq 1 "$NODES"); do
    # the full-length node id, without @address
    retry 30 gc 1 layout assign -z "dc$n" -c 1G "${ids[$((n - 1))]%@*}" || fail_start "layout assign $n"
  done
  retry 30 gc 1 layout apply --version 1 || fail_start "layout apply"
  retry "$CLUSTER_SECS" healthy || fail_start "the cluster did not become healthy in ${CLUSTER_SECS}s"

  key_json=$(gc 1 json-api CreateKey "{\"name\":\"$KEY_NAME\"}") || fail_start "key create"
  retry 30 gc 1 bucket create "$BUCKET" || fail_start "bucket create"
  retry 30 gc 1 bucket allow --read --write --owner "$BUCKET" --key "$KEY_NAME" || fail_start "bucket allow"

  python3 - "$key_json" >"$D/env.tmp" <<EOF || fail_start "could not parse the key"
import json, sys
k = json.loads(sys.argv[1])
ports = [open("$D/node%d/s3_port" % n).read().strip() for n in range(1, $NODES + 1)]
eps = " ".join("http://127.0.0.1:" + p for p in ports)
for name, value in [
    ("AWS_ENDPOINT_URL", "http://127.0.0.1:" + ports[0]),
    ("AWS_ACCESS_KEY_ID", k["accessKeyId"]),
    ("AWS_SECRET_ACCESS_KEY", k["secretAccessKey"]),
    ("AWS_REGION", "$REGION"),
    ("AWS_DEFAULT_REGION", "$REGION"),
    ("AWS_ALLOW_HTTP", "true"),
    ("GARAGE_BUCKET", "$BUCKET"),
    ("GARAGE_S3_ENDPOINTS", eps),
    ("GARAGE_DIR", "$D"),
]:
    print("export %s='%s'" % (name, value))
EOF
  mv "$D/env.tmp" "$D/env"
  chmod 600 "$D/env"
  # the S3 API answers a signed PUT/GET/DELETE before we say the cluster is ready
  # shellcheck disable=SC1091
  (source "$D/env" && retry 60 s3_probe) || fail_start "the S3 API did not answer a PUT/GET/DELETE"
  cat "$D/env"
}

cmd_stop() {
  [[ -d "$D" ]] || die "no cluster directory $D"
  stop_all
}

node_arg() {
  if [[ "${1:-}" =~ ^[1-9][0-9]*$ ]] && (($1 <= NODES)); then return 0; fi
  die "node number 1..$NODES expected, got '${1:-}'"
}

cmd_kill() {
  node_arg "${1:-}"
  local pidfile="$D/node$1/pid" pid deadline=$((SECONDS + STOP_SECS))
  alive "$pidfile" || die "node $1 of $D is not running"
  pid=$(cat "$pidfile")
  kill -KILL "$pid"
  while [[ -e "/proc/$pid" ]] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.1
  done
  rm -f "$pidfile"
}

cmd_start_node() {
  node_arg "${1:-}"
  [[ -f "$D/node$1/garage.toml" ]] || die "node $1 of $D was never started"
  alive "$D/node$1/pid" && die "node $1 of $D is running"
  # a few attempts: a port of the node may still be held for a moment (a connection closing on it)
  local attempt
  for attempt in 1 2 3; do
    start_node "$1"
    wait_node "$1" && return 0
    alive "$D/node$1/pid" && break # running but not answering: another attempt would not help
    log "node $1 exited at start (attempt $attempt): $(tail -n 3 "$D/node$1/log" 2>/dev/null | tr '\n' ' ')"
    sleep 2
  done
  die "node $1 did not come back (see $D/node$1/log)"
}

# start_time PID: the process's start time (field 22 of /proc/PID/stat), empty once it is gone; with the pid it
# names one process, so a reused pid is not taken for the watched one
start_time() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }

cmd_watch() {
  [[ "${1:-}" =~ ^[1-9][0-9]*$ ]] || die "watch: a pid expected, got '${1:-}'"
  local pid=$1 born
  born=$(start_time "$pid")
  [[ -n "$born" ]] || { stop_all; rm -rf "$D"; die "watch: process $pid is not running; stopped $D"; }
  while [[ "$(start_time "$pid")" == "$born" ]]; do sleep 1; done
  # a start still under way (its caller died mid-start) would go on starting nodes: wait for it (its own waits
  # are bounded), then stop what it started
  local starter starter_born
  sleep 1 # a start spawned just before the caller died has written start.pid by now
  if read -r starter starter_born <"$D/start.pid" 2>/dev/null; then
    while [[ -n "$starter_born" && "$(start_time "$starter")" == "$starter_born" ]]; do sleep 1; done
  fi
  stop_all
  rm -rf "$D"
}

main() {
  local cmd=${1:-} dir=${2:-}
  [[ -n "$cmd" && -n "$dir" ]] || { sed -n '2,11p' "$0" >&2; exit 2; }
  shift 2
  case "$cmd" in
    start) GB=$(garage_bin); D=$(abs_dir "$dir"); cmd_start ;;
    stop) D=$(cd "$dir" 2>/dev/null && pwd) || die "no cluster directory $dir"; cmd_stop ;;
    kill) D=$(cd "$dir" 2>/dev/null && pwd) || die "no cluster directory $dir"; cmd_kill "$@" ;;
    start-node) GB=$(garage_bin); D=$(cd "$dir" 2>/dev/null && pwd) || die "no cluster directory $dir"; cmd_start_node "$@" ;;
    env) cat "$dir/env" ;;
    watch) D=$(cd "$dir" 2>/dev/null && pwd) || die "no cluster directory $dir"; cmd_watch "$@" ;;
    *) sed -n '2,11p' "$0" >&2; exit 2 ;;
  esac
}

main "$@"
