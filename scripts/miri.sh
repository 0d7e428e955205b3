#!/usr/bin/env bash
# Miri over the code that runs without syscalls: the bio, frame, pool, buffer, limits and table
# code (unit tests of stackbd-core and stackbd-targets) and the split/complete paths end to end
# over the mem leaf (which uses a heap region instead of mmap under Miri).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    rustup component add --toolchain nightly miri rust-src
fi
cargo +nightly miri test -p stackbd-core -p stackbd-targets --lib
cargo +nightly miri test -p stackbd-testkit --test split_small
# Two threads writing and reading overlapping ranges of one mem-leaf region: no data race.
cargo +nightly miri test -p stackbd-leaves --lib region::tests
