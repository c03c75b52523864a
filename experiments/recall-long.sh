#!/usr/bin/env bash
# Issue 13 MQAR target at T >= 256 with 16+ pairs. At 4,000 steps of 4,096 tokens
# (runs/bench/recall-T256, docs/results.md) no model learns T 256: the Transformer stays at
# the copy plateau at lr 1e-3 and 3e-3. Zoology trains this case on ~100x more sequences
# (100k examples x 64 epochs); this is the longer budget that fits one core in ~1-2 hours per
# configuration: 32,000 steps of 4,096 tokens, the Transformer and gam-delta at one lr each
# (the better one at T 64), the textbook reference beside. Early stop at 99% as always.
# Resumable: finished configurations in OUT/configs are reused. One lane per core.
set -u
cd "$(dirname "$0")/.."  # the repository root
args=(--threads 1 --device cpu --seq-lens 256 --num-kv-pairs 16 32 --steps 32000
      --tokens-per-step 4096 --out runs/bench/recall-T256-long)
taskset -c 0 .venv/bin/gam bench recall "${args[@]}" --models transformer textbook-transformer \
  --lrs 1e-3 &
taskset -c 1 .venv/bin/gam bench recall "${args[@]}" --models gam-delta --lrs 3e-3 &
wait
# one report of both lanes (trains nothing: the other model x lr pairs are listed as not run)
.venv/bin/gam bench recall "${args[@]}" --models transformer textbook-transformer gam-delta \
  --lrs 1e-3 3e-3 --report-only
