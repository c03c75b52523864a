#!/usr/bin/env bash
# A/B at T 2048 (batch 1): the allocator settings before f207f85 against today's, alternating, lanes paused, core 0
set -u
cd "$(dirname "$0")/../../.."  # the repository root
T="--models transformer-pp rwkv7 gated-deltanet --preset paper --seq-len 2048 --batch-size 1 --dtype bf16 --steps 2 --warmup 1 --threads 1 --device cpu"
OLD="glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
date
for i in 1 2; do
  GAM_MALLOC_TUNING=0 GLIBC_TUNABLES=$OLD taskset -c 0 .venv/bin/gam bench throughput $T --out runs/bench/alloc-ab-T2048/old-$i | grep "ok "
  taskset -c 0 .venv/bin/gam bench throughput $T --out runs/bench/alloc-ab-T2048/new-$i | grep "ok "
done
date
