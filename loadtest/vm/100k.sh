#!/usr/bin/env bash
# 100,000 WebSockets on one hub, inside a virtual machine of its own.
#
# A process here may hold at most 20,000 open files (a hard limit this sandbox does
# not let anyone raise), and each socket is one on the hub and one on the client, so
# 100,000 sockets on one hub cannot run on this machine directly. In a VM the hub is
# root of its own kernel and may hold a million. This machine's /dev/kvm cannot run
# a guest (nested virtualisation stalls, then fails on cmpxchg16b), so the VM is
# emulated (qemu TCG): memory per socket is what it is anywhere, but every time and
# rate measured inside is the emulator's, many times slower than the CPU, and says
# nothing of the hub's speed.
#
# usage (as root; needs debootstrap, qemu-system-x86, e2fsprogs, and a release build):
#   loadtest/vm/100k.sh RESULT_PREFIX [SOCKETS]
# writes RESULT_PREFIX-connections.json, RESULT_PREFIX-fanout.json and
# RESULT_PREFIX-vm.txt (the VM and how the run went). The root filesystem is kept in
# ${HIVESYNC_VM_DIR:-/tmp/hivesync-vm}, outside the repo.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:?usage: 100k.sh RESULT_PREFIX [SOCKETS]}
sockets=${2:-100000}
vm=${HIVESYNC_VM_DIR:-/tmp/hivesync-vm}
memory=${HIVESYNC_VM_MEMORY:-12G}
# fan-out inside the emulator (~100 times slower than the CPU for this work): 1,000
# users of 100 sockets each, one event per user every 100 s (1,000 deliveries/s) for
# 200 s, then a burst of 2 events per user; the hub pings every 400 s (its idle
# timeout 1,200 s: 100,000 sockets pinged every 20 s would take the emulated CPU),
# and the run waits up to 2 minutes of silence for the last deliveries
rate=${HIVESYNC_VM_RATE:-0.01}
seconds=${HIVESYNC_VM_SECONDS:-200}
burst=${HIVESYNC_VM_BURST:-2}
users=$(( sockets / 100 > 0 ? sockets / 100 : 1 ))

for tool in debootstrap qemu-system-x86_64 mkfs.ext4; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install debootstrap qemu-system-x86 e2fsprogs)" >&2; exit 2; }
done
for binary in hivesync loadtest; do
  [ -x "$repo/target/release/$binary" ] || { echo "needs target/release/$binary: cargo build --release -p hivesync -p hivesync-loadtest" >&2; exit 2; }
done

if [ ! -e "$vm/root/boot" ] || ! ls "$vm"/root/boot/vmlinuz-* >/dev/null 2>&1; then
  mkdir -p "$vm"
  debootstrap --variant=minbase --include=linux-image-cloud-amd64,iproute2,procps \
    bookworm "$vm/root" http://deb.debian.org/debian
fi
install -d "$vm/root/opt/hivesync"
install -m 0755 "$repo/target/release/hivesync" "$repo/target/release/loadtest" "$vm/root/opt/hivesync/"
cat > "$vm/root/bench-init" <<INIT
#!/bin/sh
# PID 1 of the VM: the two runs, their JSON on the console, then power off
# the initramfs mounted /sys and /dev already
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mount -t tmpfs -o size=4G tmp /tmp
ip link set lo up
echo 2000000 > /proc/sys/fs/nr_open
echo 4000000 > /proc/sys/fs/file-max
echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range
echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse
ulimit -n 1048576
cd /opt/hivesync
echo "=== start \$(date -u +%FT%TZ) nproc \$(nproc) \$(grep MemTotal /proc/meminfo)"
./loadtest --hub ./hivesync --json /tmp/connections.json connections --count $sockets --batch 500 > /tmp/connections.log 2>&1
echo "=== connections exit \$? \$(date -u +%FT%TZ)"
tail -3 /tmp/connections.log
HIVESYNC_WS_IDLE_TIMEOUT_S=1200 ./loadtest --hub ./hivesync --json /tmp/fanout.json fanout --target embedded --sockets $sockets --users $users --rate $rate --seconds $seconds --burst $burst --drain-quiet-s 120 > /tmp/fanout.log 2>&1
echo "=== fanout exit \$? \$(date -u +%FT%TZ)"
tail -8 /tmp/fanout.log
for f in connections fanout; do echo "=== json \$f"; base64 -w0 /tmp/\$f.json; echo; done
echo "=== end"
echo o > /proc/sysrq-trigger
sleep 10
INIT
chmod 0755 "$vm/root/bench-init"
rm -f "$vm/disk.img"
mkfs.ext4 -q -F -d "$vm/root" "$vm/disk.img" 3G
kernel=$(ls "$vm"/root/boot/vmlinuz-* | tail -1)
initrd=$(ls "$vm"/root/boot/initrd.img-* | tail -1)
console="$vm/console.log"
started=$(date -u +%FT%TZ)
echo "booting the VM (qemu TCG, 2 vCPUs, $memory); the console goes to $console"
qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m "$memory" \
  -kernel "$kernel" -initrd "$initrd" \
  -append "root=/dev/vda rw console=ttyS0 init=/bench-init quiet" \
  -drive "file=$vm/disk.img,if=virtio,format=raw" \
  -display none -serial "file:$console" -net none -no-reboot
for f in connections fanout; do
  line=$(grep -A1 "^=== json $f" "$console" | tail -1 | tr -d '\r')
  if [ -n "$line" ]; then echo "$line" | base64 -d > "$out-$f.json"; else echo "no $f result in $console" >&2; fi
done
{
  echo "100,000-socket run in a VM (loadtest/vm/100k.sh), started $started on this host:"
  lscpu | grep -E "^(CPU\(s\)|Model name)"
  echo "VM: qemu $(qemu-system-x86_64 --version | head -1 | awk '{print $4}') TCG (software emulation, multi-threaded), 2 vCPUs, $memory,"
  echo "    Debian bookworm, kernel $(basename "$kernel" | sed 's/vmlinuz-//'), fs.nr_open 2000000, ulimit -n 1048576"
  echo "fan-out load: $sockets sockets, $users users, $rate rounds/s for $seconds s, burst $burst rounds"
  echo "--- console"
  grep -v "^=== json\|^[A-Za-z0-9+/=]\{200,\}" "$console" | tr -d '\r' | tail -40
} > "$out-vm.txt"
cat "$out-vm.txt"
