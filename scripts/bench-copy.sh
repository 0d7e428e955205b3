#!/usr/bin/env bash
# Copy offload vs forced emulation, 1 GiB, on file leaves on the real disk (not tmpfs):
#   one file:  the copy travels down to the leaf, which copies with copy_file_range;
#   two files: the layer that sees both copies between them in the kernel (copy_file_range);
#   --emulate: every piece read into a bounce buffer and written back.
# Runs alternate and repeat (noisy shared machine); prints the median seconds of each and ratios.
# With --xfs (as root, xfsprogs installed) the files live on a loop-mounted XFS with reflink, where
# copy_file_range clones extents instead of copying bytes.
# Usage: scripts/bench-copy.sh [--xfs] [DIR] [RUNS]   (DIR defaults to /var/tmp/stackbd-copy-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
xfs=
if [ "${1:-}" = --xfs ]; then xfs=1; shift; fi
dir=${1:-/var/tmp/stackbd-copy-bench}
runs=${2:-5}
cargo build --release -q -p stackbd
bin=$PWD/target/release/stackbd
mkdir -p "$dir"
fs="ext4 (the machine's disk)"
if [ -n "$xfs" ]; then
    truncate -s 6G "$dir.xfs.img"
    mkfs.xfs -q -f -m reflink=1 "$dir.xfs.img"
    mount -o loop "$dir.xfs.img" "$dir"
    trap 'umount "$dir"; rm -f "$dir.xfs.img"; rmdir "$dir"' EXIT
    fs="XFS with reflink (loop-mounted)"
else
    trap 'rm -rf "$dir"' EXIT
fi
dd if=/dev/urandom of="$dir/a.img" bs=1M count=1024 status=none
truncate -s 2100M "$dir/a.img"
truncate -s 2100M "$dir/b.img"
sectors=$((2100 * 2048))
cat > "$dir/copy.toml" <<TOML
[leaf.fa]
kind = "file"
path = "$dir/a.img"
[leaf.fb]
kind = "file"
path = "$dir/b.img"
[volume.one]
table = "0 $sectors linear fa 0"
[volume.two]
table = "0 $sectors linear fa 0\n$sectors $sectors linear fb 0"
TOML
len=2097152 # 1 GiB in sectors
run() { # volume dst [--emulate] -> seconds
    sync
    "$bin" copy "$1" --config "$dir/copy.toml" --src 0 --dst "$2" --len $len ${3:-} --json |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["seconds"])'
}
declare -A t
for i in $(seq "$runs"); do
    t[one_off]+="$(run one $len) "
    t[one_emu]+="$(run one $len --emulate) "
    t[two_off]+="$(run two $sectors) "
    t[two_emu]+="$(run two $sectors --emulate) "
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m1=$(echo "${t[one_off]}" | median); e1=$(echo "${t[one_emu]}" | median)
m2=$(echo "${t[two_off]}" | median); e2=$(echo "${t[two_emu]}" | median)
echo "# scripts/bench-copy.sh ${xfs:+--xfs }: 1 GiB copy on $fs, median of $runs alternating runs ($(date -u +%F), $(nproc) cores, $(uname -r))"
echo
echo "| copy | offloaded (s) | emulated (s) | offload speed-up |"
echo "|---|---|---|---|"
awk -v a="$m1" -v b="$e1" 'BEGIN { printf "| inside one file leaf (copy_file_range in the leaf) | %.3f | %.3f | %.2fx |\n", a, b, b / a }'
awk -v a="$m2" -v b="$e2" 'BEGIN { printf "| across two file leaves of one filesystem (kernel copy between them) | %.3f | %.3f | %.2fx |\n", a, b, b / a }'
echo
echo "raw seconds: one/offload ${t[one_off]}| one/emulate ${t[one_emu]}| two/kernel ${t[two_off]}| two/emulate ${t[two_emu]}"
