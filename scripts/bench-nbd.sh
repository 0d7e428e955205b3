#!/usr/bin/env bash
# NBD server benchmark: stackbd against nbdkit and qemu-nbd, each serving 1 GiB of RAM, driven by
# fio's nbd engine (libnbd) with the same jobs over a unix socket and over TCP loopback.
#
#   stackbd   `serve`, a `linear` volume over a `mem` leaf (default mode and reactors, i.e.
#             interrupt mode, one reactor per core)
#   nbdkit    `nbdkit -f memory 1G` (default threads)
#   qemu-nbd  a raw 1 GiB file in /dev/shm: `-f raw -t --shared=8 --cache=writeback --aio=threads`
#             (qemu's own defaults for cache/aio, spelled out; on tmpfs they measured as fast as or
#             faster than --cache=none and --aio=io_uring|native)
#
# Per transport, the three servers are started and each is prefilled with a 1 MiB sequential
# write over the whole device (so reads hit data); then the fio runs go one at a time, job by job,
# the servers in rotating order, so that slow phases of a shared machine hit every server alike
# (an idle server costs next to nothing). Per run: fio's IOPS, bandwidth, total-latency p50/p99,
# and the server's CPU time (utime+stime of the server process from /proc/PID/stat, all threads,
# before and after fio) as CPU µs per I/O and CPU s per GiB moved. Then stackbd alone, one
# instance at a time: 4 KiB randread QD32 in each --mode × --reactors combination.
# The machine may be shared: every run also reports fio's own CPU per I/O and how much of the
# machine other processes used meanwhile (busy time from /proc/stat minus server and fio), and
# REPEAT=N runs every cell N times and keeps each cell's best-IOPS run.
#
# Usage: scripts/bench-nbd.sh            (prints markdown on stdout, progress on stderr)
# Knobs (environment): RUNTIME=8 (s per job)  TRANSPORTS="unix tcp"  SERVERS="stackbd nbdkit qemu-nbd"
#                      MODES="interrupt poll"  REACTORS="1 2"  (MODES= skips the mode runs)
#                      REPEAT=1
#                      KEEP=1 keeps the temp dir (fio JSON, server logs)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/scripts/bench-lib.sh"
RUNTIME="${RUNTIME:-8}"
TRANSPORTS="${TRANSPORTS:-unix tcp}"
SERVERS="${SERVERS:-stackbd nbdkit qemu-nbd}"
MODES="${MODES-interrupt poll}"
REACTORS="${REACTORS:-1 2}"
REPEAT="${REPEAT:-1}"
NPROC="$(nproc)"
SIZE_BYTES=$((1 << 30))
EXPORT=bench
CLK_TCK="$(getconf CLK_TCK)"

for tool in fio nbdkit qemu-nbd python3 ss cargo; do
    command -v "$tool" >/dev/null || { echo "bench-nbd: $tool not found" >&2; exit 1; }
done

TMP="$(mktemp -d /tmp/bench-nbd.XXXXXX)"
SHM="$(mktemp -d /dev/shm/bench-nbd.XXXXXX)"
SERVER_PIDS=()

cleanup() {
    end_pids "${SERVER_PIDS[@]}"
    rm -rf "$SHM"
    if [ "${KEEP:-0}" = 1 ]; then echo "bench-nbd: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "bench-nbd: [${SECONDS}s] $*" >&2; }

# Build (a no-op when fresh) and run a private copy, so a concurrent rebuild cannot swap the
# binary under a run.
log "building stackbd (release)"
(cd "$ROOT" && cargo build --release -q -p stackbd)
cp "$ROOT/target/release/stackbd" "$TMP/stackbd"

cat >"$TMP/stackbd.toml" <<EOF
[leaf.m0]
kind = "mem"
size = "1GiB"
[volume.v]
table = "0 $((SIZE_BYTES / 512)) linear m0 0"
[export.$EXPORT]
volume = "v"
EOF

free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        [ -z "$(ss -Hltn "sport = :$p")" ] && { echo "$p"; return; }
    done
}

# Process CPU time (all threads) in clock ticks: fields 14 (utime) + 15 (stime) of /proc/PID/stat.
cpu_ticks() {
    local s rest
    s="$(<"/proc/$1/stat")"
    rest="${s##*) }"
    # shellcheck disable=SC2086
    set -- $rest
    echo $(( ${12} + ${13} ))
}

# start_server NAME "TRANSPORTS" [stackbd args...]: starts one server listening on each of
# TRANSPORTS (stackbd can serve both at once; the peers get one), sets PID, URI_unix, URI_tcp.
start_server() {
    local name="$1" transports="$2"; shift 2
    local sock="$TMP/$name.sock" port="" logf="$TMP/$name-${transports// /+}.log" listen=()
    rm -f "$sock"
    URI_unix="" URI_tcp=""
    case " $transports " in *" tcp "*) port="$(free_port)" ;; esac
    case "$name" in
    stackbd)
        listen=(--listen none)
        [ -n "$port" ] && listen=(--listen "127.0.0.1:$port")
        case " $transports " in *" unix "*) listen+=(--socket "$sock") ;; esac
        "$TMP/stackbd" serve --config "$TMP/stackbd.toml" --control "$TMP/control.sock" \
            "${listen[@]}" "$@" >"$logf" 2>&1 &
        ;;
    nbdkit)
        listen=(-U "$sock")
        [ -n "$port" ] && listen=(-i 127.0.0.1 -p "$port")
        nbdkit -f --exit-with-parent "${listen[@]}" memory 1G >"$logf" 2>&1 &
        ;;
    qemu-nbd)
        truncate -s "$SIZE_BYTES" "$SHM/disk.raw"
        listen=(--socket="$sock")
        [ -n "$port" ] && listen=(-b 127.0.0.1 -p "$port")
        qemu-nbd -f raw -x "$EXPORT" -t --shared=8 --cache=writeback --aio=threads \
            "${listen[@]}" "$SHM/disk.raw" >"$logf" 2>&1 &
        ;;
    esac
    PID=$!
    SERVER_PIDS+=("$PID")
    local ready
    for _ in $(seq 100); do
        kill -0 "$PID" 2>/dev/null || { cat "$logf" >&2; log "$name did not start"; exit 1; }
        ready=1
        case " $transports " in *" unix "*) [ -S "$sock" ] || ready=0 ;; esac
        if [ -n "$port" ] && [ -z "$(ss -Hltn "sport = :$port")" ]; then ready=0; fi
        [ "$ready" = 1 ] && break
        sleep 0.1
    done
    [ "$ready" = 1 ] || { cat "$logf" >&2; log "$name is not listening"; exit 1; }
    case " $transports " in *" unix "*) URI_unix="nbd+unix:///$EXPORT?socket=$sock" ;; esac
    [ -n "$port" ] && URI_tcp="nbd://127.0.0.1:$port/$EXPORT"
    return 0
}

stop_server() {
    kill -TERM "$PID" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
}

# prefill URI
prefill() {
    fio --name=prefill --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 --numjobs=1 \
        --size="$SIZE_BYTES" --output-format=json --output="$TMP/prefill.json" >/dev/null
    log "prefilled $1"
}

# Jobs: name rw bs iodepth.
JOBS=(
    "4k-randread-qd1 randread 4k 1"
    "4k-randread-qd32 randread 4k 32"
    "4k-randwrite-qd1 randwrite 4k 1"
    "4k-randwrite-qd32 randwrite 4k 32"
    "1m-read-qd8 read 1M 8"
    "1m-write-qd8 write 1M 8"
)

RESULTS="$TMP/results.tsv"
: >"$RESULTS"

# Busy clock ticks of the whole machine (user nice system irq softirq steal) from /proc/stat.
machine_busy() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}

# CPU seconds used by this shell's waited-for children (fio among them), from the output of
# `times` saved in file $1 (`times` must run in this shell, not in a $(...) subshell).
children_cpu() {
    awk 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
        printf "%.3f", t }' "$1"
}

sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

# run_job TABLE SERVER TRANSPORT JOB RW BS QD: one fio run against $PID at $URI_<transport>,
# one line in $RESULTS.
run_job() {
    local table="$1" server="$2" transport="$3" job="$4" rw="$5" bs="$6" qd="$7"
    local out="$TMP/$table-${server//[ -]/_}-$transport-$job-$REP.json" uri
    local c0 c1 b0 b1 f0 f1 t0 t1
    uri="URI_$transport"; uri="${!uri}"
    times >"$TMP/times0"; b0="$(machine_busy)"; t0="$(date +%s.%N)"; c0="$(cpu_ticks "$PID")"
    fio --name="$job" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --numjobs=1 --size="$SIZE_BYTES" --time_based --runtime="$RUNTIME" \
        --lat_percentiles=1 --output-format=json --output="$out" >/dev/null
    c1="$(cpu_ticks "$PID")"; t1="$(date +%s.%N)"; b1="$(machine_busy)"; times >"$TMP/times1"
    f0="$(children_cpu "$TMP/times0")"; f1="$(children_cpu "$TMP/times1")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$table" "$job" "$server" "$transport" \
        "$((c1 - c0))" "$(sub "$f1" "$f0")" "$(sub "$t1" "$t0")" "$((b1 - b0))" \
        "$out" >>"$RESULTS"
    log "$table $server/$transport $job done (pass $REP)"
}

START_DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"

read -ra SERVER_LIST <<<"$SERVERS"
NS=${#SERVER_LIST[@]}
declare -A SPID SURI
for transport in $TRANSPORTS; do
    for server in "${SERVER_LIST[@]}"; do
        start_server "$server" "$transport"
        u="URI_$transport"
        SPID[$server]=$PID
        SURI[$server]="${!u}"
        prefill "${!u}"
    done
    for REP in $(seq "$REPEAT"); do
        for ji in "${!JOBS[@]}"; do
            for k in $(seq 0 $((NS - 1))); do
                server="${SERVER_LIST[$(((k + ji + REP - 1) % NS))]}"
                PID="${SPID[$server]}"
                printf -v "URI_$transport" '%s' "${SURI[$server]}"
                # shellcheck disable=SC2086
                run_job main "$server" "$transport" ${JOBS[$ji]}
            done
        done
    done
    for server in "${SERVER_LIST[@]}"; do
        PID="${SPID[$server]}"
        stop_server
    done
    rm -f "$SHM/disk.raw"
done

for REP in $(seq "$REPEAT"); do
    for mode in $MODES; do
        for r in $REACTORS; do
            # One server for both transports: one prefill.
            start_server stackbd "$TRANSPORTS" --mode "$mode" --reactors "$r"
            t0="${TRANSPORTS%% *}"; u="URI_$t0"
            prefill "${!u}"
            for transport in $TRANSPORTS; do
                run_job modes "stackbd --mode $mode --reactors $r" "$transport" \
                    4k-randread-qd32 randread 4k 32
            done
            stop_server
        done
    done
done

LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---- report ----
cat <<EOF
# NBD server benchmark: stackbd vs nbdkit vs qemu-nbd

- command: \`REPEAT=$REPEAT RUNTIME=$RUNTIME TRANSPORTS="$TRANSPORTS" SERVERS="$SERVERS" MODES="$MODES" REACTORS="$REACTORS" scripts/bench-nbd.sh\`
- date: $START_DATE
- nproc: $NPROC; kernel: $(uname -r); load average at start / end: $LOAD_START / $LOAD_END
- $(fio --version); $(nbdkit --version | head -1); $(qemu-nbd --version | head -1)
- stackbd: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (+ uncommitted changes)'); $(rustc --version)
- servers (1 GiB each, prefilled with a 1 MiB sequential write; per transport all three are up,
  the runs go one at a time, job by job, servers in rotating order):
  stackbd \`serve --config T --listen none --socket S | --listen 127.0.0.1:P\` (defaults: interrupt mode, $NPROC reactors), volume \`0 $((SIZE_BYTES / 512)) linear m0 0\` over a 1 GiB \`mem\` leaf;
  \`nbdkit -f --exit-with-parent -U S | -i 127.0.0.1 -p P memory 1G\`;
  \`qemu-nbd -f raw -x $EXPORT -t --shared=8 --cache=writeback --aio=threads --socket=S | -b 127.0.0.1 -p P /dev/shm/.../disk.raw\`
- client: fio \`--ioengine=nbd --numjobs=1 --time_based --runtime=$RUNTIME --lat_percentiles=1\`, one connection; URIs \`nbd+unix:///$EXPORT?socket=S\` and \`nbd://127.0.0.1:P/$EXPORT\`
- p50/p99: fio total latency (submit to completion). Server CPU: utime+stime of the server process
  (all threads) across the fio run ÷ CLK_TCK ($CLK_TCK Hz, so ±1 tick = ±$((1000 / CLK_TCK)) ms per run), divided by the I/Os / GiB fio completed.
  It does not include kernel work charged to the client (e.g. loopback TCP receive processing done in fio's context).
- fio CPU µs/IO: the client's own CPU (user+sys of the fio processes) per I/O; at QD32 on $NPROC cores the client
  is often the bottleneck, which caps every server's IOPS alike.
- others' CPU: share of the machine ($NPROC CPUs × wall time of the run) used by processes other than
  the server and fio during the run (/proc/stat busy time minus both). High values mean the IOPS
  and latency of that run are depressed by unrelated load; CPU per I/O is much less affected.
- REPEAT=$REPEAT: each cell shows the run with the best IOPS out of $REPEAT.
- mode runs: one stackbd per mode × reactors, listening on both transports, prefilled once.
- ratios: IOPS ÷ best peer = stackbd IOPS / max(nbdkit, qemu-nbd) IOPS on the same transport;
  CPU ÷ best peer = stackbd CPU µs/IO / min(nbdkit, qemu-nbd) CPU µs/IO.
EOF

python3 - "$RESULTS" "$CLK_TCK" "$SIZE_BYTES" "$NPROC" "$TRANSPORTS" "$SERVERS" <<'PY'
import json, sys

results, clk, size, nproc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
transports, servers = sys.argv[5].split(), sys.argv[6].split()
best = {}
for line in open(results):
    table, job, server, transport, ticks, fio_cpu, wall, busy, path = line.rstrip("\n").split("\t")
    j = json.load(open(path))["jobs"][0]
    d = "read" if j["read"]["total_ios"] > 0 else "write"
    r = j[d]
    lat = r.get("lat_ns", {}).get("percentile") or r["clat_ns"]["percentile"]
    ios = r["total_ios"]
    cpu = int(ticks) / clk
    fio_cpu, wall = float(fio_cpu), float(wall)
    others = (int(busy) / clk - cpu - fio_cpu) / (wall * nproc)
    row = dict(table=table, job=job, server=server, transport=transport,
               fio_io=fio_cpu * 1e6 / ios if ios else float("nan"),
               others=max(0.0, others) * 100,
               iops=r["iops"], mibs=r["bw_bytes"] / 2**20,
               p50=lat["50.000000"] / 1000, p99=lat["99.000000"] / 1000,
               cpu=cpu, cpu_io=cpu * 1e6 / ios if ios else float("nan"),
               cpu_gib=cpu / (r["io_bytes"] / 2**30) if r["io_bytes"] else float("nan"))
    key = (table, job, server, transport)
    if key not in best or row["iops"] > best[key]["iops"]:
        best[key] = row
def order(r):
    t = transports.index(r["transport"]) if r["transport"] in transports else len(transports)
    s = servers.index(r["server"]) if r["server"] in servers else len(servers)
    return (r["table"] != "main", t, s)
rows = sorted(best.values(), key=order)  # stable: mode runs keep their run order

def f(x, nd=1):
    return "—" if x is None else f"{x:,.{nd}f}"

jobs = []
for r in rows:
    if r["table"] == "main" and r["job"] not in jobs:
        jobs.append(r["job"])
peers = ("nbdkit", "qemu-nbd")
goals = []
print()
print("## Results per job\n")
for job in jobs:
    print(f"### {job}\n")
    print("| server | transport | IOPS | MiB/s | p50 µs | p99 µs | server CPU µs/IO | CPU s/GiB | IOPS ÷ best peer | CPU/IO ÷ best peer | fio CPU µs/IO | others' CPU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["table"] != "main" or r["job"] != job:
            continue
        ri = rc = None
        if r["server"] == "stackbd":
            ps = [p for p in rows if p["table"] == "main" and p["job"] == job
                  and p["transport"] == r["transport"] and p["server"] in peers]
            if ps:
                ri = r["iops"] / max(p["iops"] for p in ps)
                rc = r["cpu_io"] / min(p["cpu_io"] for p in ps)
                goals.append((job, r["transport"], ri, rc))
        print(f"| {r['server']} | {r['transport']} | {f(r['iops'], 0)} | {f(r['mibs'])} | "
              f"{f(r['p50'])} | {f(r['p99'])} | {f(r['cpu_io'], 2)} | {f(r['cpu_gib'], 2)} | "
              f"{'—' if ri is None else f'{ri:.2f}×'} | {'—' if rc is None else f'{rc:.2f}×'} | "
              f"{f(r['fio_io'], 2)} | {r['others']:.0f}% |")
    print()

if goals:
    print("## Against the goals\n")
    print("Goals: server CPU per I/O ≤ 1/3 of the better peer's (every job); IOPS ≥ 1.3× the better "
          "peer's at 4 KiB QD32, ≥ 1.2× at 1 MiB sequential.\n")
    print("| job | transport | IOPS ÷ best peer | IOPS goal | met? | CPU/IO ÷ best peer | CPU goal | met? |")
    print("|---|---|---:|---:|---|---:|---:|---|")
    for job, t, ri, rc in goals:
        g = 1.3 if "qd32" in job and job.startswith("4k") else 1.2 if job.startswith("1m") else None
        print(f"| {job} | {t} | {ri:.2f}× | {'—' if g is None else f'≥ {g}×'} | "
              f"{'—' if g is None else ('yes' if ri >= g else 'no')} | {rc:.2f}× | ≤ 0.33× | "
              f"{'yes' if rc <= 1 / 3 else 'no'} |")
    print()

m = [r for r in rows if r["table"] == "modes"]
if m:
    print("## stackbd modes: 4k-randread-qd32\n")
    print("A poll-mode reactor spins on its core whether or not it has work, so its CPU time is "
          "about wall time × reactors, and CPU per I/O mostly measures how many I/Os fit in that "
          "spin; with 2 reactors in poll mode on a 2-core machine the server also competes with "
          "fio for CPU. (One connection lives on one reactor; the others idle.)\n")
    print("| server | transport | IOPS | MiB/s | p50 µs | p99 µs | server CPU s (run) | server CPU µs/IO | CPU s/GiB | fio CPU µs/IO | others' CPU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in m:
        print(f"| {r['server']} | {r['transport']} | {f(r['iops'], 0)} | {f(r['mibs'])} | "
              f"{f(r['p50'])} | {f(r['p99'])} | {f(r['cpu'], 2)} | {f(r['cpu_io'], 2)} | "
              f"{f(r['cpu_gib'], 2)} | {f(r['fio_io'], 2)} | {r['others']:.0f}% |")
    print()
PY
