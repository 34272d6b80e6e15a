#!/usr/bin/env bash
# A tree (500 files of 1 B..64 KiB in 10 directories, 10 files of 200 KiB) pushed to a --store server on a
# 3-node Garage cluster vs a --root server, alternating, 3 runs: fresh (new path; runs 2-3 reuse run 1 content),
# then unchanged with an empty client state. Usage: bench/s3-tree.sh [WORKDIR] (from the repo root, after a build).
set -euo pipefail
B=${1:-$(mktemp -d)}
FERRY=${FERRY:-target/debug/ferry}
export GARAGE=${GARAGE:-garage}
bash tests/garage/cluster.sh start $B/cluster > $B/env.out
set -a; source $B/cluster/env; set +a
# the tree: 500 files of 1..64 KiB in 10 dirs, 10 files of 200 KiB
B=$B python3 - <<'PY'
import os, random
r = random.Random(7)
for i in range(500):
    d = os.environ["B"] + f"/src/d{i%10}"; os.makedirs(d, exist_ok=True)
    open(f"{d}/f{i}", "wb").write(r.randbytes(r.randint(1, 65536)))
for i in range(10):
    open(os.environ["B"] + f"/src/m{i}.bin", "wb").write(r.randbytes(200*1024))
PY
$FERRY serve --listen 127.0.0.1:17901 --store s3://$GARAGE_BUCKET/bench --state $B/s-state > $B/s.log 2>&1 &
SP=$!
$FERRY serve --listen 127.0.0.1:17902 --root $B/root > $B/l.log 2>&1 &
LP=$!
sleep 2
for run in 1 2 3; do
  for target in s3:17901 local:17902; do
    port=${target#*:}
    rm -rf $B/c
    /usr/bin/time -f "$target run$run fresh %e s" $FERRY push $B/src ferry://127.0.0.1:$port/t$run --state $B/c --json > $B/out-$target-$run.json
    /usr/bin/time -f "$target run$run unchanged-empty-state %e s" $FERRY push $B/src ferry://127.0.0.1:$port/t$run --state $B/c2-$target-$run --json > $B/out2-$target-$run.json
    tail -1 $B/out2-$target-$run.json | python3 -c 'import json,sys; j=json.load(sys.stdin); print("  bytes_sent", j["bytes_sent"], "files_unchanged", j["files_unchanged"])'
  done
done
kill $SP $LP
bash tests/garage/cluster.sh stop $B/cluster
