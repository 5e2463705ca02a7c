#!/usr/bin/env bash
# A journaled ext4 for the runs' repositories and the hub's data, loop-mounted from a
# sparse image (root). Why: on an ext4 without a journal (this VM's root filesystem),
# each file creation checks the free inodes it passes for a recent deletion
# (ext4's find_inode_bit → recently_deleted), so creating files slows as a run deletes
# them; the projects step ran 2–4× slower there, nearly all of it in that kernel path.
#
#   loadtest/scratch-fs.sh [IMAGE [MOUNTPOINT]]
#   TMPDIR=/mnt/hivesync-bench/tmp loadtest/run-all.sh DATE projects
set -euo pipefail
image=${1:-/var/tmp/hivesync-bench.img}
mnt=${2:-/mnt/hivesync-bench}
if ! mountpoint -q "$mnt"; then
  # 70 GiB sparse, an inode per 4 KiB: 100,000 projects need millions of small files
  [ -e "$image" ] || { truncate -s 70G "$image" && mkfs.ext4 -q -F -i 4096 "$image"; }
  mkdir -p "$mnt"
  mount -o loop "$image" "$mnt"
fi
mkdir -p "$mnt/tmp"
df -hT "$mnt"
echo "TMPDIR=$mnt/tmp"
