#!/usr/bin/env bash
# The whole test suite: static checks, Rust unit tests, and the ava suite against real loop devices.
# Ends with one plain line "N passed, N failed" (each static check counts as one test).
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

passed=0
failed=0
skipped=0
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
# Tests that found a tool or kernel feature missing (off CI only; under CI=true they fail) write a line here:
# they are skips, not passes.
export LOOPDEV_SKIP_LOG="$log/unavailable"
: >"$LOOPDEV_SKIP_LOG"

check() { # name, command...
  local name=$1
  shift
  if "$@" >"$log/$name.out" 2>&1; then
    passed=$((passed + 1))
    echo "ok - $name"
  else
    failed=$((failed + 1))
    echo "not ok - $name"
    sed 's/^/    /' "$log/$name.out" | tail -40
  fi
}

bound_to_tests() { losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null | awk '$2 ~ /loopdev-test-/'; }
leaks_before=$(bound_to_tests)

check tsc npx --no-install tsc --noEmit -p tsconfig.json
# The compat and packaging tests import the built package; rebuild it so they never test stale output.
check build npm run --silent build
# arm64 is cross-built with Debian's Rust 1.63, which also proves the minimum Rust version.
# The arm64 addon is then loaded and exercised (real ioctls) in arm64 node under qemu-user.
if [ "$(uname -m)" = x86_64 ]; then
  check arm64-build bash scripts/build-arm64.sh
  check arm64-qemu bash scripts/check-arm64-qemu.sh
else
  echo "ok - arm64-build # SKIP: the cross build runs on x86_64 hosts only"
  echo "ok - arm64-qemu # SKIP: the cross build runs on x86_64 hosts only"
  skipped=$((skipped + 2))
fi
check rustfmt cargo fmt --all -- --check
check clippy cargo clippy --workspace --all-targets -- -D warnings
check import-cycles node scripts/check-import-cycles.mjs

cargo test --workspace >"$log/cargo.out" 2>&1
cargo_status=$?
grep -E '^(test |test result|error)' "$log/cargo.out"
cargo_pass=$(awk '/^test result:/ {s += $4} END {print s + 0}' "$log/cargo.out")
cargo_fail=$(awk '/^test result:/ {s += $6} END {print s + 0}' "$log/cargo.out")
# A test binary that did not finish (killed by a signal, failed to build) prints no failure of its own.
if [ "$cargo_status" -ne 0 ] && [ "$cargo_fail" -eq 0 ]; then
  echo "not ok - cargo test exited with status $cargo_status"
  tail -20 "$log/cargo.out" | sed 's/^/    /'
  cargo_fail=1
fi
passed=$((passed + cargo_pass))
failed=$((failed + cargo_fail))

npx --no-install ava --tap "$@" 2>&1 | tee "$log/ava.out" | grep -Ev '^(# (pass|fail|skip|todo)|1\.\.)'
ava_pass=$(awk '/^# pass/ {print $3}' "$log/ava.out" | tail -1)
ava_fail=$(awk '/^# fail/ {print $3}' "$log/ava.out" | tail -1)
ava_skip=$(awk '/^# skip/ {print $3}' "$log/ava.out" | tail -1)
if [ -z "$ava_pass" ]; then ava_fail=$((${ava_fail:-0} + 1)); fi
passed=$((passed + ${ava_pass:-0}))
failed=$((failed + ${ava_fail:-0}))
skipped=$((skipped + ${ava_skip:-0}))

# The reliability suite at its reduced (CI) size: concurrency, SIGKILLed attachers, bad inputs, kernel races.
npx --no-install ava --config ava.stress.config.mjs --tap 2>&1 | tee "$log/stress.out" | grep -Ev '^(# (pass|fail|skip|todo)|1\.\.)'
stress_pass=$(awk '/^# pass/ {print $3}' "$log/stress.out" | tail -1)
stress_fail=$(awk '/^# fail/ {print $3}' "$log/stress.out" | tail -1)
stress_skip=$(awk '/^# skip/ {print $3}' "$log/stress.out" | tail -1)
if [ -z "$stress_pass" ]; then stress_fail=$((${stress_fail:-0} + 1)); fi
passed=$((passed + ${stress_pass:-0}))
failed=$((failed + ${stress_fail:-0}))
skipped=$((skipped + ${stress_skip:-0}))

# Every benchmark once at a small size, without thresholds: they must keep working (figures: bench/results/).
for bench in bench/*.ts; do
  name=$(basename "$bench" .ts)
  [ "$name" = lib ] && continue
  check "bench-$name" npx --no-install tsx "$bench" --quick
done

unavailable=$(wc -l <"$LOOPDEV_SKIP_LOG")
if [ "$unavailable" -gt 0 ]; then
  sed 's/^/# SKIP (unavailable): /' "$LOOPDEV_SKIP_LOG"
  passed=$((passed - unavailable))
  skipped=$((skipped + unavailable))
fi

# Nothing the suite created may stay bound (only devices on loopdev-test-* files are ours).
leaks_after=$(bound_to_tests)
if [ "$leaks_after" != "$leaks_before" ]; then
  echo "not ok - no loop device left bound by the suite"
  echo "$leaks_after" | sed 's/^/    /'
  failed=$((failed + 1))
else
  echo "ok - no loop device left bound by the suite"
  passed=$((passed + 1))
fi

echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
