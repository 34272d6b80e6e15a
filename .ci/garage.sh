#!/usr/bin/env bash
# Make Garage 2.5.0 (the object store of ferry's S3 tests, issue 15) available and print the
# binary's absolute path on standard output (progress goes to standard error).
#
#   .ci/garage.sh [ROOT]
#
# Uses, in order, the first binary that reports version 2.5.0: $GARAGE, `garage` on PATH,
# ROOT/bin/garage. Otherwise installs it from crates.io with
# `cargo install garage --version 2.5.0 --locked --root ROOT` (about 12 minutes on a 2-core machine,
# once: later runs find it). ROOT defaults to $CARGO_HOME, else ~/.cargo, so the binary lands in
# ~/.cargo/bin. Exits non-zero if no 2.5.0 binary can be had; a caller must fail then, not skip.
#
# From .ci/run:   export GARAGE="$(bash .ci/garage.sh)"
set -euo pipefail

WANT=2.5.0
ROOT=${1:-${CARGO_HOME:-$HOME/.cargo}}

# is_wanted BIN: BIN runs and says it is version 2.5.0 (`garage --version` prints e.g.
# "garage cargo:2.5.0 [features: ...]")
is_wanted() {
  [[ -x "$1" ]] || return 1
  "$1" --version 2>/dev/null | head -n 1 | grep -qE "(^|[^0-9.])v?${WANT//./\\.}([^0-9.]|$)"
}

found() { echo "garage.sh: using $1" >&2; echo "$1"; exit 0; }

if [[ -n "${GARAGE:-}" ]] && is_wanted "$GARAGE"; then found "$GARAGE"; fi
if command -v garage >/dev/null 2>&1 && is_wanted "$(command -v garage)"; then found "$(command -v garage)"; fi
if is_wanted "$ROOT/bin/garage"; then found "$ROOT/bin/garage"; fi

command -v cargo >/dev/null || { echo "garage.sh: cargo is missing, cannot install garage" >&2; exit 1; }
echo "garage.sh: installing garage $WANT into $ROOT (cargo install, about 12 minutes)" >&2
# a build with 2 jobs keeps the machine usable; the install is a one-off
cargo install garage --version "$WANT" --locked --root "$ROOT" -j "${GARAGE_BUILD_JOBS:-2}" >&2
is_wanted "$ROOT/bin/garage" || { echo "garage.sh: $ROOT/bin/garage is not garage $WANT after the install" >&2; exit 1; }
found "$ROOT/bin/garage"
