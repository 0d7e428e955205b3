#!/usr/bin/env bash
# Regenerates every table of BENCHMARKS.md, in one run, and prints them as Markdown on stdout
# (progress goes to stderr; raw JSON lines are kept in target/bench-core/raw.jsonl).
#
#   scripts/bench-core.sh > /tmp/bench.md
#
# Environment:
#   BENCH_SECS     seconds measured per run (default 3; each run warms up 5% more first)
#   BENCH_REPS     runs per figure, peers interleaved run by run so that they see the same machine
#                  (default 3); CPU-bound figures (null leaf) are the best run, file figures the
#                  median
#   BENCH_PROFILE  1 (default) to add the callgrind instruction counts; 0 to skip them
#   CARGO_TARGET_DIR  honoured (the binary is $CARGO_TARGET_DIR/release/stackbd)
#
# Needs: cargo, python3, fio and vmtouch (`apt-get install -y fio vmtouch`), valgrind and perf
# for the profile. The file leaf is /var/tmp/stackbd-bench.img (named by bench/file-*.toml and
# bench/split-file.toml): 1 GiB of random data on the real disk, made on first use. Buffered runs
# lock it in the page cache (`vmtouch -l`): this VM otherwise reclaims cold page cache by itself
# (DAMON), and "buffered" would mean "from the disk, sometimes".
set -euo pipefail
set -f # no globbing: command lines below are built as strings
cd "$(dirname "$0")/.."

SECS=${BENCH_SECS:-3}
REPS=${BENCH_REPS:-3}
PROFILE=${BENCH_PROFILE:-1}
IMG=/var/tmp/stackbd-bench.img
OUT=target/bench-core
RAW=$OUT/raw.jsonl
BIN=${CARGO_TARGET_DIR:-target}/release/stackbd
mkdir -p "$OUT"
: >"$RAW"

log() { echo "bench-core: $*" >&2; }

for tool in fio vmtouch; do
    command -v $tool >/dev/null || { log "$tool is missing: apt-get install -y $tool"; exit 1; }
done
VMTOUCH_PID=
cleanup() { if [ -n "$VMTOUCH_PID" ]; then kill "$VMTOUCH_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT
log "cargo build --release"
cargo build --release >&2

fstype=$(findmnt -n -o FSTYPE --target "$(dirname "$IMG")" || echo unknown)
if [ "$fstype" = tmpfs ]; then
    log "$(dirname "$IMG") is tmpfs: the file leaf must be on the real disk"
    exit 1
fi
if [ "$(stat -c %s "$IMG" 2>/dev/null || echo 0)" != 1073741824 ]; then
    log "making $IMG (1 GiB of random data)"
    dd if=/dev/urandom of="$IMG" bs=1M count=1024 conv=fsync status=none
fi

# sb NAME ARGS...: one `stackbd bench --json` run, recorded under NAME.
sb() {
    local name=$1
    shift
    local cmd="$BIN bench $* --json"
    log "$name: $cmd"
    local out
    out=$($cmd)
    printf '{"name":"%s","cmd":"%s","r":%s}\n' "$name" "$cmd" "$out" >>"$RAW"
}

# fio_run NAME QD DIRECT: fio io_uring 4 KiB random reads on the file, pinned to CPU 0 as
# reactor 0 is, recorded with stackbd's key names (latency is fio's total latency, submission
# to completion, as stackbd measures it).
fio_run() {
    local name=$1 qd=$2 direct=$3
    local cmd="fio --name=raw --filename=$IMG --ioengine=io_uring --rw=randread --bs=4k"
    cmd="$cmd --iodepth=$qd --direct=$direct --numjobs=1 --cpus_allowed=0 --time_based"
    cmd="$cmd --runtime=${SECS}s --ramp_time=$((SECS * 50))ms --lat_percentiles=1"
    cmd="$cmd --output-format=json"
    log "$name: $cmd"
    local out
    out=$($cmd | python3 -c '
import json, sys
r = json.load(sys.stdin)["jobs"][0]["read"]
p = r["lat_ns"]["percentile"]
print(json.dumps({"iops": r["iops"], "lat_us_p50": p["50.000000"] / 1000,
                  "lat_us_p99": p["99.000000"] / 1000, "errors": 0}))')
    printf '{"name":"%s","cmd":"%s","r":%s}\n' "$name" "$cmd" "$out" >>"$RAW"
}

T="--time ${SECS}s"

# 1. Layer cost: null leaf, 4 KiB randread QD32, one reactor, 1/2/4/8 linear volumes.
for _ in $(seq "$REPS"); do
    for d in 1 2 4 8; do
        sb "layer:$d" --config bench/null-chain.toml --volume d$d --rw randread --bs 4k --qd 32 \
            --threads 1 --mode poll $T
    done
done

# 2. The null leaf at depth 1 (the 10M IOPS per core goal): reads, and writes (which the null
#    leaf drops without touching the buffer, where a read zero-fills it).
for _ in $(seq "$REPS"); do
    for rw in randread randwrite; do
        for bs in 4k 512; do
            sb "qd1:$rw:$bs" --config bench/null-chain.toml --volume d1 --rw $rw --bs $bs --qd 1 \
                --threads 1 --mode poll $T
        done
    done
done

# 3 and 4. The file leaf: completion modes, and linear over the file against fio on the same
#    file, interleaved run by run.
for cache in direct buffered; do
    if [ $cache = buffered ]; then
        log "locking $IMG in the page cache"
        vmtouch -q -l -d -P "$OUT/vmtouch.pid" "$IMG"
        # The daemon writes its pid once the whole file is read and locked.
        for _ in $(seq 600); do
            [ -s "$OUT/vmtouch.pid" ] && break
            sleep 0.5
        done
        VMTOUCH_PID=$(cat "$OUT/vmtouch.pid")
        fincore -b -n -o RES "$IMG" | tr -d ' ' >"$OUT/cached.before"
        direct=0
    else
        direct=1
    fi
    for qd in 1 32; do
        for _ in $(seq "$REPS"); do
            fio_run "file:$cache:$qd:fio" $qd $direct
            for mode in interrupt poll hybrid; do
                sb "file:$cache:$qd:$mode" --config bench/file-$cache.toml --volume lin \
                    --rw randread --bs 4k --qd $qd --threads 1 --mode $mode $T
            done
        done
    done
done

fincore -b -n -o RES "$IMG" | tr -d ' ' >"$OUT/cached.after"
cleanup
VMTOUCH_PID=

# 5. Allocations per I/O through linear -> striped -> linear -> leaf, every I/O split.
for leaf in mem null file; do
    sb "alloc:$leaf" --config bench/split-$leaf.toml --volume top --rw randrw --bs 4k --qd 32 \
        --threads 1 --mode poll $T
done

# 6. Profile: instructions per I/O on the reactor thread (callgrind, deterministic), from the
#    difference of two run lengths so that set-up cancels out.
if [ "$PROFILE" = 1 ] && command -v valgrind >/dev/null; then
    cg() {
        local name=$1 ios=$2
        shift 2
        local cmd="valgrind --tool=callgrind --toggle-collect=std::sys::backtrace::__rust_begin_short_backtrace*"
        cmd="$cmd --callgrind-out-file=$OUT/callgrind.$name.$ios.out $BIN bench $* --ios $ios --json"
        log "$name: $cmd"
        local out ir
        out=$($cmd 2>"$OUT/callgrind.$name.$ios.log")
        ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$OUT/callgrind.$name.$ios.log")
        printf '{"name":"cg:%s:%s","cmd":"%s","ir":%s,"r":%s}\n' "$name" "$ios" "$cmd" "$ir" "$out" >>"$RAW"
    }
    for d in 1 2 8; do
        for ios in 50000 150000; do
            cg "d$d" $ios --config bench/null-chain.toml --volume d$d --rw randwrite --bs 4k \
                --qd 32 --mode poll
        done
    done
    for ios in 50000 150000; do
        cg "qd1" $ios --config bench/null-chain.toml --volume d1 --rw randwrite --bs 4k --qd 1 \
            --mode poll
    done
    callgrind_annotate --inclusive=no "$OUT/callgrind.qd1.150000.out" 2>/dev/null |
        grep -E '^ *[0-9,]+ \(' | head -16 >"$OUT/callgrind.qd1.top.txt" || true
fi
# Where the time goes (cpu-clock sampling: this VM has no hardware counters for `perf stat`).
if [ "$PROFILE" = 1 ] && command -v perf >/dev/null; then
    perf stat -e instructions true >"$OUT/perf-stat.txt" 2>&1 || true
    for rw in randread randwrite; do
        cmd="perf record -q -e cpu-clock -o $OUT/perf.$rw.data $BIN bench"
        cmd="$cmd --config bench/null-chain.toml --volume d1 --rw $rw --bs 4k --qd 1 --mode poll"
        cmd="$cmd --time ${SECS}s"
        log "$cmd"
        echo "$cmd" >"$OUT/perf.$rw.cmd"
        $cmd >/dev/null 2>&1 || true
        perf report -i "$OUT/perf.$rw.data" --no-children --sort symbol --stdio 2>/dev/null |
            grep -E '^ +[0-9.]+%' | head -14 >"$OUT/perf.$rw.top.txt" || true
    done
fi

# The tables.
python3 - "$RAW" "$SECS" "$REPS" "$OUT" <<'EOF'
import json, statistics, sys, os, subprocess

raw, secs, reps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
runs = {}
cmds = {}
for line in open(raw):
    j = json.loads(line)
    runs.setdefault(j["name"], []).append(j)
    cmds.setdefault(j["name"], j["cmd"])

def med(name, key):
    return statistics.median(r["r"][key] for r in runs[name])

def best(name, key="iops"):
    """The least disturbed run: the one with the most IOPS (its `key`)."""
    return max(runs[name], key=lambda r: r["r"]["iops"])["r"][key]

def ints(x):
    return f"{x:,.0f}"

def cmd(name):
    return "    " + cmds[name]

def sh(c):
    return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()

print("## Machine\n")
print("```")
for c in ("nproc", "uname -r", "grep -m1 'model name' /proc/cpuinfo",
          "cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
          "findmnt -n -o SOURCE,FSTYPE --target /var/tmp", "fio --version",
          "uptime   # the load average while the figures were taken"):
    print(f"$ {c}")
    print(sh(c.split("   #")[0]))
print("```\n")
cached = [int(open(os.path.join(out, f"cached.{w}")).read()) >> 20 for w in ("before", "after")]
print(f"Every run measures {secs} s after a 5% warm-up; each configuration ran {reps} times, peers")
print("interleaved run by run. CPU-bound figures (null leaf) are the best of those runs, the least")
print("disturbed by the other tenants; file figures are the median. Shared 2-core VM: the figures")
print("are noisy; compare within a table.\n")

print("## Layer cost (null leaf, 4 KiB randread, QD32, 1 reactor)\n")
print("```")
print(cmd("layer:1").replace("--volume d1", "--volume dN"))
print("```\n")
print("| linear volumes | IOPS | ns per I/O | ns per extra layer (vs 1) |")
print("|---:|---:|---:|---:|")
ns1 = 1e9 / best("layer:1")
for d in (1, 2, 4, 8):
    iops = best(f"layer:{d}")
    ns = 1e9 / iops
    extra = "" if d == 1 else f"{(ns - ns1) / (d - 1):.1f}"
    print(f"| {d} | {ints(iops)} | {ns:.1f} | {extra} |")
print()

print("## The null leaf at depth 1 (1 linear volume, QD1, poll mode)\n")
print("```")
print(cmd("qd1:randread:4k"))
print("```\n")
print("| rw | bs | IOPS | ns per I/O | p50 µs | p99 µs |")
print("|---|---:|---:|---:|---:|---:|")
for rw in ("randread", "randwrite"):
    for bs in ("4k", "512"):
        n = f"qd1:{rw}:{bs}"
        iops = best(n)
        print(f"| {rw} | {bs} | {ints(iops)} | {1e9 / iops:.1f} | {best(n, 'lat_us_p50'):.2f} | "
              f"{best(n, 'lat_us_p99'):.2f} |")
print()

print("## Completion modes (linear over a 1 GiB file leaf, 4 KiB randread, 1 reactor)\n")
print("```")
print(cmd("file:direct:1:poll").replace("--mode poll", "--mode MODE").replace("--qd 1", "--qd QD"))
print(cmd("file:buffered:1:poll").replace("--mode poll", "--mode MODE").replace("--qd 1", "--qd QD"))
print("```\n")
print(f"Buffered runs: the file is locked in the page cache (`vmtouch -l`); `fincore` counted "
      f"{cached[0]} MiB of its 1024 MiB cached before them and {cached[1]} MiB after.\n")
print("| file | QD | mode | IOPS | × interrupt | p50 µs | p99 µs |")
print("|---|---:|---|---:|---:|---:|---:|")
for cache in ("direct", "buffered"):
    for qd in (1, 32):
        base = med(f"file:{cache}:{qd}:interrupt", "iops")
        for mode in ("interrupt", "poll", "hybrid"):
            n = f"file:{cache}:{qd}:{mode}"
            iops = med(n, "iops")
            label = "O_DIRECT" if cache == "direct" else "buffered"
            print(f"| {label} | {qd} | {mode} | {ints(iops)} | {iops / base:.2f} | "
                  f"{med(n, 'lat_us_p50'):.1f} | {med(n, 'lat_us_p99'):.1f} |")
print()

print("## The raw limit: stackbd `linear` over the file vs fio io_uring on the same file\n")
print("```")
print(cmd("file:direct:1:fio").replace("--iodepth=1", "--iodepth=QD").replace("--direct=1", "--direct=D"))
print(cmd("file:direct:1:poll").replace("--mode poll", "--mode MODE").replace("--qd 1", "--qd QD")
      .replace("file-direct", "file-{direct,buffered}"))
print("```\n")
print("| file | QD | fio IOPS | stackbd poll IOPS | ratio | stackbd interrupt IOPS | ratio | fio p50 µs | stackbd poll p50 µs |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for cache in ("direct", "buffered"):
    for qd in (1, 32):
        f = med(f"file:{cache}:{qd}:fio", "iops")
        p = med(f"file:{cache}:{qd}:poll", "iops")
        i = med(f"file:{cache}:{qd}:interrupt", "iops")
        label = "O_DIRECT" if cache == "direct" else "buffered"
        print(f"| {label} | {qd} | {ints(f)} | {ints(p)} | {p / f:.2f} | {ints(i)} | {i / f:.2f} | "
              f"{med(f'file:{cache}:{qd}:fio', 'lat_us_p50'):.1f} | "
              f"{med(f'file:{cache}:{qd}:poll', 'lat_us_p50'):.1f} |")
print()

print("## Allocations per I/O through `linear -> striped -> linear -> leaf`, every I/O split\n")
print("```")
print(cmd("alloc:mem").replace("split-mem", "split-{mem,null,file}"))
print("```\n")
print("| leaf | I/Os measured | heap allocations | allocs per I/O | splits | frame overflows | errors | IOPS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for leaf in ("mem", "null", "file"):
    r = runs[f"alloc:{leaf}"][0]["r"]
    label = "file (O_DIRECT)" if leaf == "file" else leaf
    print(f"| {label} | {r['ios']:,} | {r['allocs']} | {r['allocs_per_io']} | {r['splits']:,} | "
          f"{r['frame_overflows']} | {r['errors']} | {ints(r['iops'])} |")
print()

if "cg:d1:50000" in runs:
    def per_io(name):
        a, b = runs[f"cg:{name}:50000"][0], runs[f"cg:{name}:150000"][0]
        # 5% warm-up on top of the measured I/Os.
        return (b["ir"] - a["ir"]) / ((150000 - 50000) * 1.05)
    print("## Profile: instructions per I/O on the reactor thread (callgrind)\n")
    print("```")
    print(cmds["cg:d1:50000"].replace("d1.50000", "dN.IOS").replace("--volume d1", "--volume dN")
          .replace("--ios 50000", "--ios IOS"))
    print("```\n")
    print("Difference of `--ios 50000` and `--ios 150000` runs (set-up cancels out); randwrite,")
    print("so the null leaf does not zero-fill the buffer.\n")
    print("| linear volumes | instructions per I/O (QD32) | per extra layer (vs 1) |")
    print("|---:|---:|---:|")
    i1 = per_io("d1")
    for d in (1, 2, 8):
        x = per_io(f"d{d}")
        extra = "" if d == 1 else f"{(x - i1) / (d - 1):.0f}"
        print(f"| {d} | {x:.0f} | {extra} |")
    print(f"\nQD1 randwrite, 1 linear volume: {per_io('qd1'):.0f} instructions per I/O. Top "
          "functions (self cost, `--ios 150000` run):\n")
    print("```")
    print(f"$ callgrind_annotate --inclusive=no {out}/callgrind.qd1.150000.out")
    print(open(os.path.join(out, "callgrind.qd1.top.txt")).read().rstrip())
    print("```\n")

if os.path.exists(os.path.join(out, "perf.randread.top.txt")):
    print("## Profile: where the time goes at QD1 (perf, cpu-clock sampling)\n")
    print("```")
    print("$ perf stat -e instructions true")
    print(open(os.path.join(out, "perf-stat.txt")).read().strip())
    print("```\n")
    for rw in ("randread", "randwrite"):
        print("```")
        c = open(os.path.join(out, f"perf.{rw}.cmd")).read().strip()
        print(f"$ {c}")
        print(f"$ perf report -i {out}/perf.{rw}.data --no-children --sort symbol --stdio")
        print(open(os.path.join(out, f"perf.{rw}.top.txt")).read().rstrip())
        print("```\n")

print("## Goals\n")
qd1 = best("qd1:randread:4k")
qd1w = best("qd1:randwrite:4k")
per_layer = ((1e9 / best("layer:8")) - ns1) / 7
pi = med("file:direct:1:poll", "iops") / med("file:direct:1:interrupt", "iops")
pib = med("file:buffered:1:poll", "iops") / med("file:buffered:1:interrupt", "iops")
print("| goal | target | measured |")
print("|---|---|---|")
print(f"| null leaf, depth 1, one core | ≥ 10M IOPS | {qd1 / 1e6:.2f}M (randread 4k), {qd1w / 1e6:.2f}M (randwrite 4k) |")
print(f"| each extra linear layer | ≤ 10 ns | {per_layer:.1f} ns (1 → 8 layers, QD32) |")
print(f"| poll vs interrupt, QD1, file leaf | ≥ 1.4× | {pi:.2f}× O_DIRECT, {pib:.2f}× buffered |")
worst = min(med(f"file:{c}:{q}:poll", "iops") / med(f"file:{c}:{q}:fio", "iops")
            for c in ("direct", "buffered") for q in (1, 32))
print(f"| linear over a file vs fio io_uring | ≥ 0.95× | {worst:.2f}× at worst (poll mode; table above) |")
EOF
