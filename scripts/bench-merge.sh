#!/usr/bin/env bash
# Request merging benchmark: a round-robin multipath volume over two nbd leaves, each leaf an
# nbdkit server (file plugin) on one shared 1 GiB backing file, exported by stackbd and driven
# by fio's nbd engine (libnbd) over a unix socket.
#
# Cases (bench/merge/CASE.toml; @DIR@ is this run's temp dir):
#   rq-none      request-based (queue_mode rq, the default), scheduler "none"
#   rq-none-nr4  as rq-none with nr_requests = 4 (fewer requests out at once, so more merging)
#   rq-deadline  request-based, scheduler "deadline"
#   bio          queue_mode bio: no request queue, every bio goes to a path as it comes
# Jobs: 4 KiB sequential writes (what merging is for) and 4 KiB random writes (the control: few
# neighbours to merge with), each at QD32, time-based.
#
# Per case, one daemon serves every job in turn; around each fio run the script reads
# `stackbd stats --json` (reactor totals) and reports the deltas: leaf_ios (bios and requests
# handed to the leaves, i.e. NBD requests sent to the servers), rq_requests (requests dispatched
# by the request queue), rq_merges (bios merged into a request), with fio's IOPS, MiB/s and I/O
# count. "leaf I/Os per client I/O" = leaf_ios ÷ fio's I/Os; "bio ÷ this" = bio's leaf I/Os per
# client I/O ÷ this case's (how many times fewer NBD requests the servers get than in bio mode).
#
# The machine may be shared: REPEAT=N runs every case N times, the cases in rotating order, and
# keeps each cell's best-IOPS run (the counters are those of that run).
#
# Usage: scripts/bench-merge.sh            (prints markdown on stdout, progress on stderr)
# Knobs (environment): RUNTIME=8 (s per job)  CASES="rq-none rq-none-nr4 rq-deadline bio"  REPEAT=1
#                      BACKING=tmpfs|disk (backing file in /dev/shm or under /var/tmp; tmpfs)
#                      REACTORS=  (stackbd --reactors; default: the daemon's own)
#                      KEEP=1 keeps the temp dir (fio JSON, stats, logs)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/scripts/bench-lib.sh"
RUNTIME="${RUNTIME:-8}"
CASES="${CASES:-rq-none rq-none-nr4 rq-deadline bio}"
BACKING="${BACKING:-tmpfs}"
REACTORS="${REACTORS:-}"
REPEAT="${REPEAT:-1}"
NPROC="$(nproc)"
SIZE_BYTES=$((1 << 30))

for tool in fio nbdkit python3 cargo; do
    command -v "$tool" >/dev/null || { echo "bench-merge: $tool not found" >&2; exit 1; }
done
for c in $CASES; do
    [ -f "$ROOT/bench/merge/$c.toml" ] || { echo "bench-merge: no bench/merge/$c.toml" >&2; exit 1; }
done

TMP="$(mktemp -d /tmp/bench-merge.XXXXXX)"
case "$BACKING" in
tmpfs) IMGDIR="$(mktemp -d /dev/shm/bench-merge.XXXXXX)" ;;
disk) IMGDIR="$(mktemp -d /var/tmp/bench-merge.XXXXXX)" ;;
*) echo "bench-merge: BACKING must be tmpfs or disk" >&2; exit 1 ;;
esac
IMG="$IMGDIR/disk.img"
PIDS=()

# Ends only the processes this script started, by PID.
cleanup() {
    end_pids "${PIDS[@]}"
    rm -rf "$IMGDIR"
    if [ "${KEEP:-0}" = 1 ]; then echo "bench-merge: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "bench-merge: [${SECONDS}s] $*" >&2; }

# Build (a no-op when fresh) and run a private copy, so a concurrent rebuild cannot swap the
# binary under a run.
log "building stackbd (release)"
(cd "$ROOT" && cargo build --release -q -p stackbd)
cp "$ROOT/target/release/stackbd" "$TMP/stackbd"

truncate -s "$SIZE_BYTES" "$IMG"

# wait_socket PID SOCK LOG NAME: until SOCK exists while PID lives.
wait_socket() {
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || { cat "$3" >&2; log "$4 exited"; exit 1; }
        [ -S "$2" ] && return 0
        sleep 0.1
    done
    cat "$3" >&2
    log "$4 is not listening on $2"
    exit 1
}

# The two paths: one nbdkit each, serving the same file (through the page cache, so each sees
# the other's writes).
for p in p0 p1; do
    nbdkit -f --exit-with-parent -U "$TMP/$p.sock" file "$IMG" >"$TMP/$p.log" 2>&1 &
    PIDS+=("$!")
    wait_socket "$!" "$TMP/$p.sock" "$TMP/$p.log" "nbdkit $p"
done
log "nbdkit p0, p1 serving $IMG ($BACKING)"

# Jobs: name rw bs iodepth.
JOBS=(
    "4k-seqwrite-qd32 write 4k 32"
    "4k-randwrite-qd32 randwrite 4k 32"
)

stats() { "$TMP/stackbd" stats --json --control "$TMP/control.sock" >"$1"; }

RESULTS="$TMP/results.tsv"
: >"$RESULTS"

read -ra CASE_LIST <<<"$CASES"
NC=${#CASE_LIST[@]}
for REP in $(seq "$REPEAT"); do
    for k in $(seq 0 $((NC - 1))); do
        c="${CASE_LIST[$(((k + REP - 1) % NC))]}"
        sed "s|@DIR@|$TMP|g" "$ROOT/bench/merge/$c.toml" >"$TMP/$c.toml"
        extra=()
        [ -n "$REACTORS" ] && extra=(--reactors "$REACTORS")
        rm -f "$TMP/mp.sock" "$TMP/control.sock"
        "$TMP/stackbd" serve --config "$TMP/$c.toml" --control "$TMP/control.sock" --listen none \
            --socket "$TMP/mp.sock" "${extra[@]}" >"$TMP/stackbd-$c.log" 2>&1 &
        DPID=$!
        PIDS+=("$DPID")
        wait_socket "$DPID" "$TMP/mp.sock" "$TMP/stackbd-$c.log" "stackbd ($c)"
        wait_socket "$DPID" "$TMP/control.sock" "$TMP/stackbd-$c.log" "stackbd ($c) control"
        uri="nbd+unix:///mp?socket=$TMP/mp.sock"
        log "case $c (pass $REP): $(grep table "$TMP/$c.toml" | head -1)"
        for j in "${JOBS[@]}"; do
            read -r job rw bs qd <<<"$j"
            out="$TMP/$c-$job-$REP"
            stats "$out.before.json"
            fio --name="$job" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
                --numjobs=1 --size="$SIZE_BYTES" --time_based --runtime="$RUNTIME" \
                --output-format=json --output="$out.fio.json" >/dev/null
            stats "$out.after.json"
            printf '%s\t%s\t%s\n' "$c" "$job" "$out" >>"$RESULTS"
            log "case $c: $job done (pass $REP)"
        done
        "$TMP/stackbd" shutdown --control "$TMP/control.sock" >/dev/null 2>&1 || kill -TERM "$DPID"
        for _ in $(seq 100); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DPID" 2>/dev/null || true
        wait "$DPID" 2>/dev/null || true
    done
done

# ---- report ----
cat <<EOF
# Request merging: multipath queue_mode rq vs bio

- command: \`REPEAT=$REPEAT RUNTIME=$RUNTIME CASES="$CASES" BACKING=$BACKING${REACTORS:+ REACTORS=$REACTORS} scripts/bench-merge.sh\`
- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); nproc: $NPROC; kernel: $(uname -r); load average: $(cut -d' ' -f1-3 /proc/loadavg)
- $(fio --version); $(nbdkit --version | head -1)
- stackbd: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (+ uncommitted changes)'); $(rustc --version)
- paths: two \`nbdkit -f -U SOCK file IMG\` on one 1 GiB file ($BACKING); stackbd \`serve --listen none --socket S${REACTORS:+ --reactors $REACTORS}\`,
  volume: round-robin multipath over leaves p0, p1 (bench/merge/CASE.toml)
- client: fio \`--ioengine=nbd --numjobs=1 --size=1G --time_based --runtime=$RUNTIME\`, one connection
- counters: deltas of \`stackbd stats --json\` totals around each fio run. leaf I/Os per client I/O =
  leaf_ios ÷ fio I/Os; bio ÷ this = (bio's leaf I/Os per client I/O) ÷ (this case's).
- REPEAT=$REPEAT: each cell shows the run with the best IOPS out of $REPEAT (cases in rotating order).
EOF

python3 - "$RESULTS" "$CASES" <<'PY'
import json, sys

results, cases = sys.argv[1], sys.argv[2].split()
best = {}
for line in open(results):
    case, job, base = line.rstrip("\n").split("\t")
    before = json.load(open(base + ".before.json"))["totals"]
    after = json.load(open(base + ".after.json"))["totals"]
    d = {k: after.get(k, 0) - before.get(k, 0)
         for k in ("leaf_ios", "rq_bios", "rq_requests", "rq_merges", "requeued", "submitted")}
    j = json.load(open(base + ".fio.json"))["jobs"][0]
    io = j["write"] if j["write"]["total_ios"] > 0 else j["read"]
    if j.get("error"):
        sys.exit(f"bench-merge: fio {case}/{job} reported error {j['error']}")
    ios = io["total_ios"]
    row = dict(case=case, job=job, iops=io["iops"], mibs=io["bw_bytes"] / 2**20, ios=ios,
               per=d["leaf_ios"] / ios if ios else float("nan"), **d)
    if (case, job) not in best or row["iops"] > best[(case, job)]["iops"]:
        best[(case, job)] = row
rows = list(best.values())

jobs = []
for r in rows:
    if r["job"] not in jobs:
        jobs.append(r["job"])
for job in jobs:
    rs = [r for r in rows if r["job"] == job]
    rs.sort(key=lambda r: cases.index(r["case"]) if r["case"] in cases else len(cases))
    bio = next((r for r in rs if r["case"] == "bio"), None)
    print(f"\n## {job}\n")
    print("| case | IOPS | MiB/s | client I/Os | leaf_ios | rq_requests | rq_merges | leaf I/Os per client I/O | bio ÷ this |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
        ratio = "—"
        if bio is not None and r["per"] > 0:
            ratio = f"{bio['per'] / r['per']:.2f}×"
        print(f"| {r['case']} | {r['iops']:,.0f} | {r['mibs']:,.1f} | {r['ios']:,} | "
              f"{r['leaf_ios']:,} | {r['rq_requests']:,} | {r['rq_merges']:,} | "
              f"{r['per']:.3f} | {ratio} |")
print()
PY
