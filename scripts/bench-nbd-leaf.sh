#!/usr/bin/env bash
# The nbd leaf (stackbd's NBD client) against the peer client on the same server: one
# `nbdkit memory 1G` on a unix socket, driven in turn by
#   fio-libnbd    fio --ioengine=nbd (libnbd), one connection: the peer, and the raw limit of
#                 what this server gives one client connection
#   stackbd-leaf  stackbd bench over `linear` on an nbd leaf (one reactor, one connection),
#                 interrupt mode (it sleeps on the socket, as libnbd does)
#   stackbd-poll  the same in poll mode (the reactor never sleeps)
# Jobs: 4 KiB random reads and writes at QD32, 128 KiB sequential reads at QD8, time-based.
# "÷ fio" is the case's IOPS over fio-libnbd's in the same pass.
#
# The machine may be shared and has few cores (server and client share them): REPEAT=N runs
# every case N times in rotating order and keeps each cell's best run.
#
# Usage: scripts/bench-nbd-leaf.sh   (markdown on stdout, progress on stderr)
# Knobs (environment): RUNTIME=6 (s per run)  REPEAT=3  KEEP=1 (keep the temp dir)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/scripts/bench-lib.sh"
RUNTIME="${RUNTIME:-6}"
REPEAT="${REPEAT:-3}"
CASES=(fio-libnbd stackbd-leaf stackbd-poll)

for tool in fio nbdkit python3 cargo; do
    command -v "$tool" >/dev/null || { echo "bench-nbd-leaf: $tool not found" >&2; exit 1; }
done

TMP="$(mktemp -d /tmp/bench-nbd-leaf.XXXXXX)"
PIDS=()
# Ends only the processes this script started, by PID.
cleanup() {
    end_pids "${PIDS[@]}"
    if [ "${KEEP:-0}" = 1 ]; then echo "bench-nbd-leaf: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "bench-nbd-leaf: [${SECONDS}s] $*" >&2; }

log "building stackbd (release)"
(cd "$ROOT" && cargo build --release -q -p stackbd)
cp "$ROOT/target/release/stackbd" "$TMP/stackbd"

SOCK="$TMP/srv.sock"
nbdkit -f --exit-with-parent -U "$SOCK" memory 1G >"$TMP/nbdkit.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 100); do
    [ -S "$SOCK" ] && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$TMP/nbdkit.log" >&2; exit 1; }
    sleep 0.1
done
[ -S "$SOCK" ] || { log "nbdkit is not listening"; exit 1; }
URI="nbd+unix:///?socket=$SOCK"

cat >"$TMP/leaf.toml" <<EOF
[leaf.n]
kind = "nbd"
uri = "$URI"
connections = 1
timeout = "30s"

[volume.v]
table = "0 2097152 linear n 0"
EOF

# Fill the export once, so reads return data rather than holes the server makes up.
log "filling the export"
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size=1G \
    --output-format=json --output="$TMP/fill.json" >/dev/null

# Jobs: name rw(fio) rw(stackbd) bs qd.
JOBS=(
    "4k-randread-qd32 randread randread 4k 32"
    "4k-randwrite-qd32 randwrite randwrite 4k 32"
    "128k-read-qd8 read read 128k 8"
)

RESULTS="$TMP/results.tsv"
: >"$RESULTS"
NC=${#CASES[@]}
for REP in $(seq "$REPEAT"); do
    for j in "${JOBS[@]}"; do
        read -r job frw srw bs qd <<<"$j"
        for k in $(seq 0 $((NC - 1))); do
            c="${CASES[$(((k + REP - 1) % NC))]}"
            out="$TMP/$c-$job-$REP.json"
            case "$c" in
            fio-libnbd)
                fio --name="$job" --ioengine=nbd --uri="$URI" --rw="$frw" --bs="$bs" \
                    --iodepth="$qd" --numjobs=1 --size=1G --time_based --runtime="$RUNTIME" \
                    --output-format=json --output="$out" >/dev/null
                ;;
            stackbd-leaf | stackbd-poll)
                mode=interrupt
                [ "$c" = stackbd-poll ] && mode=poll
                "$TMP/stackbd" bench --config "$TMP/leaf.toml" --volume v --rw "$srw" --bs "$bs" \
                    --qd "$qd" --threads 1 --mode "$mode" --time "${RUNTIME}s" --json >"$out"
                ;;
            esac
            printf '%s\t%s\t%s\t%s\n' "$c" "$job" "$REP" "$out" >>"$RESULTS"
            log "$c: $job done (pass $REP)"
        done
    done
done

cat <<EOF
# The nbd leaf vs libnbd (fio) on one nbdkit server

- command: \`REPEAT=$REPEAT RUNTIME=$RUNTIME scripts/bench-nbd-leaf.sh\`
- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); nproc: $(nproc); kernel: $(uname -r); load average: $(cut -d' ' -f1-3 /proc/loadavg)
- $(fio --version); $(nbdkit --version | head -1)
- stackbd: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (+ uncommitted changes)'); $(rustc --version)
- server: \`nbdkit -f -U SOCK memory 1G\` (filled once); every client uses one connection
- fio-libnbd: \`fio --ioengine=nbd --numjobs=1 --time_based --runtime=$RUNTIME\`
- stackbd-leaf / -poll: \`stackbd bench --config leaf.toml --volume v --threads 1 --mode interrupt|poll --time ${RUNTIME}s\`,
  \`v\` = \`linear\` over an \`nbd\` leaf (\`connections = 1\`)
- REPEAT=$REPEAT: each cell is the best of $REPEAT runs (cases in rotating order); "÷ fio" = IOPS ÷ fio-libnbd's IOPS
EOF

python3 - "$RESULTS" <<'PY'
import json, sys

best = {}
for line in open(sys.argv[1]):
    case, job, rep, path = line.rstrip("\n").split("\t")
    j = json.load(open(path))
    if case == "fio-libnbd":
        fj = j["jobs"][0]
        if fj.get("error"):
            sys.exit(f"bench-nbd-leaf: fio {job} reported error {fj['error']}")
        io = fj["write"] if fj["write"]["total_ios"] > 0 else fj["read"]
        pct = io["clat_ns"].get("percentile", {})
        row = dict(iops=io["iops"], mibs=io["bw_bytes"] / 2**20,
                   p50=pct.get("50.000000", 0) / 1000, p99=pct.get("99.000000", 0) / 1000,
                   errors=0)
    else:
        row = dict(iops=j["iops"], mibs=j["mib_s"], p50=j["lat_us_p50"], p99=j["lat_us_p99"],
                   errors=j["errors"])
        if row["errors"]:
            sys.exit(f"bench-nbd-leaf: {case} {job}: {row['errors']} errors ({j['first_error']})")
    if (case, job) not in best or row["iops"] > best[(case, job)]["iops"]:
        best[(case, job)] = row

jobs = []
for (_, job) in best:
    if job not in jobs:
        jobs.append(job)
cases = ["fio-libnbd", "stackbd-leaf", "stackbd-poll"]
for job in jobs:
    fio = best.get(("fio-libnbd", job))
    print(f"\n## {job}\n")
    print("| client | IOPS | MiB/s | p50 µs | p99 µs | ÷ fio |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in cases:
        r = best.get((c, job))
        if r is None:
            continue
        ratio = f"{r['iops'] / fio['iops']:.2f}×" if fio else "—"
        print(f"| {c} | {r['iops']:,.0f} | {r['mibs']:,.1f} | {r['p50']:,.1f} | {r['p99']:,.1f} | {ratio} |")
print()
PY
