# Pieces the bench scripts share; source it after setting `work` (a scratch directory) and `pids` (an array of
# processes the script kills on exit). Not run by CI.

# median: the median of the numbers on stdin, one per line (the lower middle one of an even count).
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# write_bytes PID: bytes the process (and its reaped children) caused to be written to storage (/proc/PID/io).
write_bytes() { awk '/^write_bytes/ {print $2}' "/proc/$1/io" 2> /dev/null || echo 0; }

# daemon_writes_since BEFORE: bytes the rsync daemon ($rsync_pid) wrote since its write_bytes was BEFORE, read once it
# has reaped the child that served the last transfer (whose writes then count as its own).
daemon_writes_since() {
  sleep 0.2
  echo "$(($(write_bytes "$rsync_pid") - $1))"
}

# start_proxy UPSTREAM: examples/delay_proxy ($proxy_bin if set) in front of UPSTREAM, adding 20 ms each way (a 40 ms
# round trip); sets proxy_addr and proxy_pid (added to pids).
start_proxy() {
  # The last proxy's output goes first: the redirection truncates it only once the new one runs, and a grep before
  # that would find the old address.
  rm -f "$work/proxy.out"
  "${proxy_bin:-$repo/target/release/examples/delay_proxy}" "$1" 20 > "$work/proxy.out" &
  proxy_pid=$!
  pids+=("$proxy_pid")
  for _ in $(seq 1200); do grep -q listening "$work/proxy.out" 2> /dev/null && break; sleep 0.05; done
  proxy_addr=$(sed -n 's/^listening on //p' "$work/proxy.out")
}

# free_port: prints a TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_rsync_daemon: an rsync daemon on loopback whose module `dst` is $work/rsync-dst; sets rsync_port and
# rsync_pid (added to pids) and rsync_url.
start_rsync_daemon() {
  rsync_port=$(free_port)
  mkdir -p "$work/rsync-dst"
  cat > "$work/rsyncd.conf" << CONF
use chroot = no
uid = $(id -u)
gid = $(id -g)
pid file = $work/rsyncd.pid
[dst]
  path = $work/rsync-dst
  read only = no
CONF
  rsync --daemon --no-detach --config="$work/rsyncd.conf" --port="$rsync_port" --address=127.0.0.1 &
  rsync_pid=$!
  pids+=("$rsync_pid")
  sleep 0.5
  rsync_url="rsync://127.0.0.1:$rsync_port/dst"
}

# make_small_tree DIR COUNT: COUNT files of 4-64 KiB of seeded random bytes, 500 to a directory, under DIR (the
# same tree every time).
make_small_tree() {
  mkdir -p "$1"
  python3 - "$1" "$2" << 'PY'
import os, random, sys
root, count = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
for i in range(count):
    d = os.path.join(root, f"d{i // 500:03}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05}.bin"), "wb") as f:
        f.write(rng.randbytes(rng.randint(4096, 65536)))
PY
}

# edited FILE COMMAND...: runs COMMAND (an edit of FILE), then sets FILE's mtime one second past what it was
# before the edit. An edit that keeps the size and lands in the same second as the copy pushed before would
# otherwise pass rsync's quick check (size and mtime) and never be sent, and the script's cmp would fail.
edited() {
  local file=$1 before
  shift
  before=$(stat -c %Y "$file")
  "$@"
  touch -m -d "@$((before + 1))" "$file"
}
