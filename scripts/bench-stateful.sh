#!/usr/bin/env bash
# Benchmarks of issue 10 (stateful targets in the core), for BENCHMARKS.md:
#  1. layer cost A/B: null-leaf chains of 1 and 8 linear volumes, this build against a baseline
#     binary (BASE=path/to/old/stackbd), interleaved, REPEAT runs each, medians;
#  2. delay latency: 4 KiB reads at QD1 through `delay 5 ms` vs `linear` over a null leaf,
#     p50/p99 added latency (interrupt mode: the reactor sleeps until the timer).
# Usage: BASE=/path/to/base/stackbd [REPEAT=5] [TIME=3s] scripts/bench-stateful.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-5}
TIME=${TIME:-3s}
NEW=${NEW:-target/release/stackbd}
[ -x "$NEW" ] || cargo build --release -p stackbd
: "${BASE:?set BASE to a stackbd binary built from the commit before the change}"

field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "## layer cost A/B (null leaf, 4 KiB randread, QD32, 1 reactor, poll, $TIME, $REPEAT runs interleaved)"
declare -A ns
for i in $(seq "$REPEAT"); do
    for bin in base new; do
        b=$BASE; [ $bin = new ] && b=$NEW
        for v in d1 d8; do
            iops=$("$b" bench --config bench/null-chain.toml --volume $v --rw randread --bs 4k \
                --qd 32 --threads 1 --mode poll --time "$TIME" --json | field iops)
            n=$(python3 -c "print(round(1e9/$iops, 1))")
            ns[$bin.$v]+="$n "
            echo "run $i $bin $v: $iops IOPS, $n ns/IO"
        done
    done
done
for bin in base new; do
    d1=$(echo ${ns[$bin.d1]} | tr ' ' '\n' | median)
    d8=$(echo ${ns[$bin.d8]} | tr ' ' '\n' | median)
    per=$(python3 -c "print(round(($d8-$d1)/7, 1))")
    echo "median $bin: d1 $d1 ns/IO, d8 $d8 ns/IO, per extra layer $per ns"
done

echo
echo "## delay latency (null leaf, 4 KiB randread, QD1, 1 reactor, interrupt, $TIME, $REPEAT runs)"
for i in $(seq "$REPEAT"); do
    for v in lin dl5; do
        out=$("$NEW" bench --config bench/delay.toml --volume $v --rw randread --bs 4k --qd 1 \
            --threads 1 --mode interrupt --time "$TIME" --json)
        p50=$(echo "$out" | field lat_us_p50)
        p99=$(echo "$out" | field lat_us_p99)
        echo "run $i $v: p50 $p50 us, p99 $p99 us"
    done
done
