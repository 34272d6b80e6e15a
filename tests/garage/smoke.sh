#!/usr/bin/env bash
# Smoke check of the 3-node Garage test cluster (tests/garage/cluster.sh):
#   1. start it; a PUT, GET and LIST round trip through node 1's S3 API
#   2. a PUT with `If-None-Match: *` over an existing key: reports whether this Garage honours
#      conditional writes (docs/object-store.md relies on neither answer, but says which it saw)
#   3. SIGKILL node 3: a PUT and GET still succeed with 2 of 3 nodes (quorum), and the object
#      written before the kill still reads back
#   4. SIGKILL node 2 as well: a PUT must now fail (no write quorum), within a bounded time
#   5. node 2 back: a PUT succeeds again; stop the cluster (every node by pid)
# Exit 0 only if every step behaved as stated. Usage: smoke.sh [DIR] (default: a fresh temp dir,
# removed at the end).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
S3="python3 $HERE/s3.py"
if [[ -n "${1:-}" ]]; then DIR=$1; KEEP=1; else DIR=$(mktemp -d); KEEP=0; fi
WORK=$(mktemp -d)

cleanup() {
  "$HERE/cluster.sh" stop "$DIR" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  if ((KEEP == 0)); then rm -rf "$DIR"; fi
}
trap cleanup EXIT

step() { echo "smoke: $*"; }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

step "starting a 3-node cluster in $DIR"
"$HERE/cluster.sh" start "$DIR" >/dev/null
# shellcheck disable=SC1091
source "$DIR/env"
B=$GARAGE_BUCKET

head -c 3000000 /dev/urandom >"$WORK/a"
printf 'second object\n' >"$WORK/b"

step "PUT/GET/LIST through $AWS_ENDPOINT_URL"
$S3 put "$B" smoke/a "$WORK/a"
$S3 put "$B" smoke/b "$WORK/b"
$S3 get "$B" smoke/a >"$WORK/a.back"
cmp "$WORK/a" "$WORK/a.back" || fail "GET smoke/a differs from what was PUT"
[[ "$($S3 list "$B" smoke/)" == $'smoke/a\nsmoke/b' ]] || fail "LIST smoke/ did not return exactly smoke/a, smoke/b"
[[ -z "$($S3 list "$B" nothing-here/)" ]] || fail "LIST of an empty prefix returned keys"

step "a PUT without x-amz-content-sha256 is refused"
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT --data-binary @"$WORK/b" "$AWS_ENDPOINT_URL/$B/smoke/unsigned")
[[ "$code" =~ ^4 ]] || fail "an unsigned PUT got HTTP $code"

step "conditional PUT (If-None-Match: *) over an existing key"
if $S3 -H 'If-None-Match: *' put "$B" smoke/b "$WORK/a" 2>"$WORK/cond.err"; then
  if $S3 get "$B" smoke/b | cmp -s - "$WORK/a"; then
    echo "smoke: conditional writes: IGNORED (If-None-Match: * overwrote an existing object)"
  else
    fail "the conditional PUT answered 2xx but the object did not change"
  fi
else
  grep -q '^HTTP 412' "$WORK/cond.err" || fail "conditional PUT failed oddly: $(head -1 "$WORK/cond.err")"
  echo "smoke: conditional writes: HONOURED (412 Precondition Failed)"
fi

step "SIGKILL node 3; quorum is 2 of 3"
"$HERE/cluster.sh" kill "$DIR" 3
$S3 put "$B" smoke/after-kill "$WORK/a" || fail "PUT with 2 of 3 nodes failed"
$S3 get "$B" smoke/after-kill | cmp -s - "$WORK/a" || fail "GET with 2 of 3 nodes differs"
$S3 get "$B" smoke/a | cmp -s - "$WORK/a" || fail "an object written before the kill does not read back"
listing=$($S3 list "$B" smoke/) || fail "LIST with 2 of 3 nodes failed"
grep -qx smoke/after-kill <<<"$listing" || fail "LIST with 2 of 3 nodes misses smoke/after-kill"

step "SIGKILL node 2 as well: no write quorum, a PUT must fail"
"$HERE/cluster.sh" kill "$DIR" 2
start=$SECONDS
if $S3 put "$B" smoke/no-quorum "$WORK/b" 2>"$WORK/noq.err"; then
  fail "a PUT succeeded with 1 of 3 nodes"
fi
echo "smoke: refused after $((SECONDS - start))s: $(head -1 "$WORK/noq.err")"

step "node 2 back: PUT succeeds again"
"$HERE/cluster.sh" start-node "$DIR" 2
ok=0
for _ in $(seq 1 60); do
  if $S3 put "$B" smoke/back "$WORK/b" 2>/dev/null; then ok=1; break; fi
  sleep 1
done
((ok == 1)) || fail "PUT still failing 60 tries after node 2 came back"
$S3 get "$B" smoke/back | cmp -s - "$WORK/b" || fail "GET after node 2 came back differs"

step "stop"
"$HERE/cluster.sh" stop "$DIR"
for n in 1 2 3; do
  [[ ! -e "$DIR/node$n/pid" ]] || fail "node $n pid file left behind"
done
if pgrep -f "$DIR/node[0-9]/garage.toml" >/dev/null; then fail "a garage process of $DIR still runs"; fi
echo "smoke: OK"
