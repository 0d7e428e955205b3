#!/usr/bin/env bash
# raid1 benchmark (issue 15), for BENCHMARKS.md: raid1 over two mem leaves vs `linear` over one
# of them (bench/raid-mem.toml) through `stackbd bench`, 4 KiB random reads and writes, QD32,
# THREADS reactors (poll), REPEAT interleaved runs, medians and the raid1/linear ratio. The
# resync throughput (a full rebuild of a leg vs a plain copy of the same size through the same
# engine) comes from the `raid_bench` test (release build).
# Usage: [REPEAT=3] [TIME=3s] [THREADS=2] scripts/bench-raid.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-3}
TIME=${TIME:-3s}
THREADS=${THREADS:-2}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/stackbd}
[ -x "$BIN" ] || cargo build --release -p stackbd

field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A iops allocs
for i in $(seq "$REPEAT"); do
    for rw in randread randwrite; do
        for v in lin r; do
            out=$("$BIN" bench --config bench/raid-mem.toml --volume $v --rw $rw --bs 4k \
                --qd 32 --threads "$THREADS" --mode poll --time "$TIME" --json)
            io=$(echo "$out" | field iops)
            al=$(echo "$out" | field allocs_per_io)
            iops[$v.$rw]+="$io "; allocs[$v.$rw]="$al"
            echo "run $i $v 4k $rw: $io IOPS, allocs/IO $al" >&2
        done
    done
done

echo "| I/O | linear IOPS (median) | raid1 IOPS (median) | raid1 / linear | goal | allocs/IO (raid1) |"
echo "|---|---:|---:|---:|---:|---:|"
for rw in randread randwrite; do
    l=$(echo ${iops[lin.$rw]} | tr ' ' '\n' | median)
    r=$(echo ${iops[r.$rw]} | tr ' ' '\n' | median)
    goal=1.6; [ $rw = randwrite ] && goal=0.9
    echo "| 4k $rw | $l | $r | $(python3 -c "print(f'{$r/$l:.2f}x')") | >= ${goal}x | ${allocs[r.$rw]} |"
done
echo
echo "resync vs plain copy (cargo test --release -p stackbd-targets --test raid_bench -- --ignored):" >&2
cargo test --release -q -p stackbd-targets --test raid_bench -- --ignored --nocapture 2>&1 |
    grep -E '^\|' || true
