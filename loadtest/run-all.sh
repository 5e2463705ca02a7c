#!/usr/bin/env bash
# Every run docs/benchmarks.md quotes, in the order it quotes them, each
# writing its raw JSON to loadtest/results/PREFIX-<name>.json. One command, so every
# figure there comes from a command anyone can run:
#
#   cargo build --release -p hivesync -p hivesync-loadtest
#   loadtest/run-all.sh 2026-12-02b           # every step but ab, ~35 minutes on 2 cores
#   loadtest/run-all.sh 2026-12-02b syncs     # one step (names below)
#
# The runs keep their repositories and the hub's data under $TMPDIR: put it on a
# journaled filesystem (loadtest/scratch-fs.sh says why and makes one); the figures in
# docs/benchmarks.md from 2026-12-07b on were measured that way.
#
# Needs redis-server and redis-cli (the tool starts its own on free ports), node and
# npm for the Socket.IO peer, git; the 100k step also needs root, debootstrap,
# qemu-system-x86 and e2fsprogs (see loadtest/vm/100k.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:?usage: loadtest/run-all.sh DATE [STEP ...]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(machine fanout-embedded fanout-redis fanout-half fanout-durable fanout-cluster plot publish connections syncs reads freshness fairness scheduler soak soak-gitoxide projects 100k)
R=loadtest/results/$prefix
L="target/release/loadtest --hub target/release/hivesync"
# the fan-out load: 10,000 sockets over 100 users, 10 events per user per second for
# 10 s (100,000 deliveries/s offered), then a burst of 300 rounds (3,000,000 deliveries)
FAN="--sockets 10000 --users 100 --rate 10 --seconds 10 --burst 300"

for step in "${steps[@]}"; do
  echo "=== $step ($(date -u +%FT%TZ))"
  case $step in
    machine)
      { lscpu | grep -E "^(CPU\(s\)|Model name|Thread\(s\) per core)"; free -g | head -2
        uname -srm; redis-server --version; node --version; git --version
        echo "perf bench sched pipe (a wake-up across cores, then on one):"
        perf bench sched pipe -l 20000 2>/dev/null | grep usecs || echo "  (perf not installed)"
        taskset -c 0 perf bench sched pipe -l 20000 2>/dev/null | grep usecs || true
      } > "$R-machine.txt" ;;
    fanout-embedded)
      $L --json "$R-fanout-embedded.json" fanout --target embedded --peer socketio --hubs 1 $FAN --rounds 3 ;;
    fanout-redis)
      $L --json "$R-fanout-redis.json" fanout --target redis --peer socketio --hubs 2 $FAN --rounds 3 ;;
    fanout-half)
      # the same sockets at half the rate (50,000 deliveries/s offered) and a smaller
      # burst: where the 100,000/s runs above saturate this machine's 2 cores
      HALF="--sockets 10000 --users 100 --rate 5 --seconds 10 --burst 30"
      $L --json "$R-fanout-embedded-half.json" fanout --target embedded --peer socketio --hubs 1 $HALF --rounds 3
      $L --json "$R-fanout-redis-half.json" fanout --target redis --peer socketio --hubs 2 $HALF --rounds 3 ;;
    fanout-durable)
      $L --json "$R-fanout-embedded-durable.json" fanout --target embedded --durable $FAN --rounds 3
      $L --json "$R-fanout-redis-durable.json" fanout --target redis --durable --hubs 2 $FAN --rounds 3 ;;
    fanout-cluster)
      $L --json "$R-fanout-redis-cluster.json" fanout --target redis-cluster --hubs 2 $FAN --rounds 3 ;;
    plot)
      target/release/loadtest --json /dev/null plot --out "$R-fanout-latency.svg" \
        "$R-fanout-embedded.json" "$R-fanout-redis.json" "$R-fanout-embedded-half.json" "$R-fanout-redis-half.json" ;;
    publish)
      target/release/loadtest --json "$R-publish.json" publish ;;
    connections)
      $L --json "$R-connections-10k.json" connections --count 10000 ;;
    syncs)
      $L --json "$R-syncs.json" syncs ;;
    reads)
      $L --json "$R-reads.json" reads ;;
    fairness)
      # one owner's 12 first syncs of 3,000-file repositories, then 4 other owners'
      # single presses: their wait against one flood sync
      $L --json "$R-fairness.json" fairness --flood 12 --files 3000 --others 4 --workers 2
      # the same with no cap (the flood may hold both workers): order alone
      $L --json "$R-fairness-uncapped.json" fairness --flood 12 --files 3000 --others 4 --workers 2 --owner-cap 2 ;;
    freshness)
      $L --json "$R-freshness.json" freshness --projects 20 --rate 10 --seconds 20 --interval 5 ;;
    scheduler)
      target/release/loadtest --json "$R-scheduler.json" scheduler --projects 100000 --due 100 ;;
    soak)
      # one project, 1,000 commit-then-sync rounds of a 3,000-file repository (a
      # force-push every 250), beside git clone --mirror with git's own auto-gc
      $L --json "$R-soak.json" soak --rounds 1000 --files 3000 --every 100 --force-every 250 --reads 2000 \
        --grace-s 30 --plot "$R-soak.svg" ;;
    soak-gitoxide)
      # the same with housekeeping by gitoxide alone (a worker image without git)
      $L --json "$R-soak-gitoxide.json" soak --rounds 1000 --files 3000 --every 100 --force-every 250 --reads 2000 \
        --grace-s 30 --housekeeping-tool gitoxide --plot "$R-soak-gitoxide.svg" ;;
    projects)
      # one hub through 1,000 then 10,000 projects (HIVESYNC_READER_CACHE 256)
      $L --json "$R-projects.json" projects --count 1000,10000 --seconds 20 ;;
    projects-store-cache)
      # the same with the embedded store's page cache at 8 MiB (the hub inherits it)
      HIVESYNC_STORE_CACHE_MB=8 $L --json "$R-projects-store-cache-8mb.json" projects \
        --count 1000,4000 --seconds 10 ;;
    projects-memory)
      # where the hub's memory per project goes: 1,000 then 4,000 projects as
      # configured, without snapshot watches, and with glibc held to two arenas
      $L --json "$R-projects-watch.json" projects --count 1000,4000 --seconds 10
      HIVESYNC_SNAPSHOT_WATCHES=0 $L --json "$R-projects-nowatch.json" projects --count 1000,4000 --seconds 10
      MALLOC_ARENA_MAX=2 $L --json "$R-projects-arena2.json" projects --count 1000,4000 --seconds 10
      # and past the point where the watch table is full (16,384 directories)
      $L --json "$R-projects-capped.json" projects --count 4000,7000 --seconds 10 ;;
    allocator)
      # the hub with glibc's malloc (the default build) against mimalloc (feature
      # `mimalloc`, built in its own target directory), one after the other, each
      # through 1,000, 4,000 then 7,000 projects (memory, not time: one run each),
      # neither trimming its heap (HIVESYNC_MALLOC_TRIM_S=0): the allocators alone
      CARGO_TARGET_DIR=target/mimalloc cargo build --release -q -p hivesync --features mimalloc
      for v in glibc mimalloc; do
        hub=$([ $v = glibc ] && echo target/release/hivesync || echo target/mimalloc/release/hivesync)
        HIVESYNC_MALLOC_TRIM_S=0 target/release/loadtest --hub "$hub" --json "$R-projects-$v.json" projects \
          --count 1000,4000,7000 --seconds 10
      done ;;
    projects-heap)
      # the hub's live heap by heaptrack through 300 then 1,200 projects (its own
      # RSS figures in the JSON are heaptrack's, not the hub's)
      W=$(mktemp); printf '#!/bin/sh\nexec heaptrack -o %s %s "$@"\n' "/tmp/projects-heap" "$PWD/target/release/hivesync" > "$W"; chmod +x "$W"
      rm -f /tmp/projects-heap.zst
      target/release/loadtest --hub "$W" --json /tmp/projects-heap.json projects --count 300,1200 --seconds 5
      heaptrack_print -f /tmp/projects-heap.zst --print-leaks=0 --print-peaks=0 --print-allocators=0 \
        --print-temporary=0 --print-histogram=0 --flamegraph-cost-type=leaked -F /tmp/projects-heap.fg \
        | grep "^peak\|^total" > "$R-projects-heap.txt"
      python3 - /tmp/projects-heap.fg >> "$R-projects-heap.txt" <<'PY'
import collections, sys
sites = ["(cached_file.rs)", "(broadcast.rs)", "arm (watch.rs)", "repo (read.rs)",
         "tree_at (read.rs)", "(page_manager.rs)", "(events.rs)"]
live = collections.Counter()
for line in open(sys.argv[1]):
    stack, _, cost = line.rstrip("\n").rpartition(" ")
    if not cost.isdigit():
        continue
    frames = stack.split(";")
    key = next((f for f in reversed(frames) if any(s in f for s in sites)), "(other)")
    live[key] += int(cost)
print("\nlive at the end (1,200 projects), by the allocating call site, from heaptrack_print -F with --flamegraph-cost-type=leaked:")
for key, cost in live.most_common(10):
    print(f"{cost:>10} {key[:120]}")
PY
      rm -f "$W" ;;
    projects-100k)
      # 100 users of 1,000 projects each (the per-user quota); put $TMPDIR on a
      # filesystem with room for ~11 million inodes (loadtest/scratch-fs.sh)
      $L --json "$R-projects-100k.json" projects --count 1000,10000,50000,100000 --seconds 20 ;;
    projects-trims)
      # what the heap trims every HIVESYNC_MALLOC_TRIM_S cost as projects grow: the
      # points' heap_trims (count, mean, p99 and longest bound, memory given back)
      $L --json "$R-projects-trims.json" projects --count 1000,10000,50000 --seconds 20 ;;
    projects-untrimmed)
      # the same hub never trimming its heap, to ${UNTRIMMED:-50000} projects; glibc's
      # own account of the heap (malloc_stats, printed into the hub's stderr by gdb)
      # once the last count is synced, as its random reads begin
      n=${UNTRIMMED:-50000}
      HIVESYNC_MALLOC_TRIM_S=0 $L --json "$R-projects-untrimmed.json" projects \
        --count 1000,10000,$n --seconds 20 2> "$R-projects-untrimmed.txt" &
      tool=$!
      while kill -0 $tool 2>/dev/null && ! grep -q "^$n projects synced" "$R-projects-untrimmed.txt"; do sleep 2; done
      gdb -p "$(pgrep -n -f 'release/hivesync serve')" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1 || true
      wait $tool ;;
    100k)
      loadtest/vm/100k.sh "$R-100k" ;;
    ab-mirrors)
      # syncs and reads, the hub before the long-lived-mirrors work (bef48ea) against
      # the hub now, one after the other in the same session:
      #   git worktree add /tmp/old bef48ea
      #   (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target cargo build --release -p hivesync)
      #   HIVESYNC_OLD_HUB=/tmp/old-target/release/hivesync loadtest/run-all.sh DATE ab-mirrors
      old=${HIVESYNC_OLD_HUB:?set HIVESYNC_OLD_HUB to the hub binary built from the commit before}
      for step in syncs reads; do
        for v in old new; do
          hub=$([ $v = old ] && echo "$old" || echo target/release/hivesync)
          target/release/loadtest --hub "$hub" --json "$R-ab-$step-$v.json" $step
        done
      done ;;
    ab)
      # the hub before this round against the hub now, alternated, same tool:
      #   git worktree add /tmp/old ad55719 && (cd /tmp/old && cargo build --release -p hivesync)
      #   HIVESYNC_OLD_HUB=/tmp/old/target/release/hivesync loadtest/run-all.sh DATE ab
      old=${HIVESYNC_OLD_HUB:?set HIVESYNC_OLD_HUB to the hub binary built from the commit before}
      for n in 1 2; do
        for v in old new; do
          hub=$([ $v = old ] && echo "$old" || echo target/release/hivesync)
          target/release/loadtest --hub "$hub" --json "$R-ab-fanout-redis-$v-$n.json" \
            fanout --target redis --hubs 2 $FAN
          sleep 20
        done
      done
      for v in old new; do
        hub=$([ $v = old ] && echo "$old" || echo target/release/hivesync)
        target/release/loadtest --hub "$hub" --json "$R-ab-syncs-$v.json" syncs
        sleep 20
      done ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  # what a run leaves in TIME_WAIT and in the page cache should not weigh on the next
  sleep 20
done
