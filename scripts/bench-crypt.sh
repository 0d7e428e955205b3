#!/usr/bin/env bash
# crypt benchmark (issue 12), for BENCHMARKS.md: `crypt aes-xts-plain64` (512-bit key) over a
# null leaf through `stackbd bench`, 1 reactor (poll), QD32, random reads and writes of 4 KiB
# and 128 KiB, crypt sector sizes 512 and 4096, next to `openssl speed -elapsed -evp
# aes-256-xts -bytes 512|4096` on the same core, REPEAT interleaved runs, medians.
# Prints one table: GB/s per reactor and the ratio to openssl at the same sector size.
# Usage: [REPEAT=3] [TIME=3s] scripts/bench-crypt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-3}
TIME=${TIME:-3s}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/stackbd}
[ -x "$BIN" ] || cargo build --release -p stackbd
command -v openssl >/dev/null || { echo "openssl CLI needed" >&2; exit 1; }

field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ossl() { # bytes -> GB/s of one openssl speed run (1 s)
    openssl speed -elapsed -seconds 1 -evp aes-256-xts -bytes "$1" 2>/dev/null |
        awk '/^AES-256-XTS/ {v=$2; sub(/k$/,"",v); printf "%.3f\n", v*1000/1e9}'
}

declare -A gbs iops
for i in $(seq "$REPEAT"); do
    for b in 512 4096; do
        g=$(ossl $b); gbs[ossl.$b]+="$g "
        echo "run $i openssl aes-256-xts $b B: $g GB/s" >&2
    done
    for v in c512 c4k lin; do
        for bs in 4k 128k; do
            for rw in randread randwrite; do
                out=$("$BIN" bench --config bench/crypt-null.toml --volume $v --rw $rw --bs $bs \
                    --qd 32 --threads 1 --mode poll --time "$TIME" --json)
                io=$(echo "$out" | field iops)
                mib=$(echo "$out" | field mib_s)
                al=$(echo "$out" | field allocs_per_io)
                g=$(python3 -c "print(round($mib*1048576/1e9, 3))")
                gbs[$v.$bs.$rw]+="$g "; iops[$v.$bs.$rw]+="$io "
                echo "run $i $v $bs $rw: $io IOPS, $g GB/s, allocs/IO $al" >&2
            done
        done
    done
done

o512=$(echo ${gbs[ossl.512]} | tr ' ' '\n' | median)
o4k=$(echo ${gbs[ossl.4096]} | tr ' ' '\n' | median)
echo "| volume | I/O | op | IOPS (median) | GB/s per reactor | vs openssl same sector |"
echo "|---|---|---|---:|---:|---:|"
for v in c512 c4k lin; do
    ref=$o512; [ $v = c4k ] && ref=$o4k
    for bs in 4k 128k; do
        for rw in randread randwrite; do
            m=$(echo ${gbs[$v.$bs.$rw]} | tr ' ' '\n' | median)
            n=$(echo ${iops[$v.$bs.$rw]} | tr ' ' '\n' | median)
            r="-"; [ $v != lin ] && r=$(python3 -c "print(f'{$m/$ref:.2f}x')")
            echo "| $v | $bs | $rw | $n | $m | $r |"
        done
    done
done
echo "| openssl speed aes-256-xts | 512 B | encrypt | | $o512 | 1.00x |"
echo "| openssl speed aes-256-xts | 4096 B | encrypt | | $o4k | 1.00x |"
