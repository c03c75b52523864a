#!/usr/bin/env bash
# A/B: the allocator settings before f207f85 (threshold + trim; via glibc tunables, gam's own tuning off)
# against today's (gam's tuning: + M_MMAP_MAX=0), alternating, lanes paused, core 0
set -u
cd "$(dirname "$0")/../../.."  # the repository root
T="--models gam gam-delta --preset paper --seq-len 256 --batch-size 4 --dtype bf16 --steps 3 --warmup 1 --threads 1 --device cpu"
OLD="glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
date
for i in 1 2 3; do
  GAM_MALLOC_TUNING=0 GLIBC_TUNABLES=$OLD taskset -c 0 .venv/bin/gam bench throughput $T --out runs/bench/alloc-ab-T256/old-$i | grep "ok "
  taskset -c 0 .venv/bin/gam bench throughput $T --out runs/bench/alloc-ab-T256/new-$i | grep "ok "
done
date
