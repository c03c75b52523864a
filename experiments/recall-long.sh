#!/usr/bin/env bash
# Issue 13 MQAR target at T >= 256 with 16+ pairs. At 4,000 steps of 4,096 tokens
# (runs/bench/recall-T256, docs/results.md) no model learns T 256: the Transformer stays at
# the copy plateau at lr 1e-3 and 3e-3. Zoology trains this case on ~100x more sequences
# (100k examples x 64 epochs); this is a longer budget that still fits this machine:
# 32,000 steps of 4,096 tokens (8x the first run). Early stop at 99% as always.
# Order: the two Transformers first, one per core (the library's and the textbook reference:
# whether T 256 has a case where the Transformer reaches 99% decides what gam-delta is held
# to), then gam-delta at two lrs, one per core. gam-delta is ~3x slower per step than the
# Transformer here (~0.45 vs ~0.14 s on one core), so its two configurations are most of the
# cost: about 4 h each without an early stop.
# Resumable: finished configurations in OUT/configs are reused, an interrupted one continues
# from its last validation.
set -u
cd "$(dirname "$0")/.."  # the repository root
args=(--threads 1 --device cpu --seq-lens 256 --num-kv-pairs 16 32 --steps 32000
      --tokens-per-step 4096 --out runs/bench/recall-T256-long)
recall() { .venv/bin/gam bench recall "${args[@]}" "$@"; }
(taskset -c 0 bash -c "$(declare -p args); $(declare -f recall)
  recall --models transformer --lrs 1e-3; recall --models gam-delta --lrs 3e-3") &
(taskset -c 1 bash -c "$(declare -p args); $(declare -f recall)
  recall --models textbook-transformer --lrs 1e-3; recall --models gam-delta --lrs 1e-3") &
wait
# one report of both lanes (trains nothing: configurations not finished are listed as not run)
recall --models transformer textbook-transformer gam-delta --lrs 1e-3 3e-3 --report-only
