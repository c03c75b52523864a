#!/usr/bin/env bash
# Issues 24 and 25: the synthetic tasks of the new families beside the old ones, and recall as
# a rate over seeds and learning rates (issue 24, item 7). Default init, one thread per run,
# two lanes (one per core, taskset); resumable: every (model, length, lr, seed) of `gam bench
# recall` and every (model, seed) of `gam bench listops` is its own record, reused when
# finished, resumed from its last checkpoint when interrupted, so an interrupted session
# re-runs this script. The parts, in the order they run, with their estimated cost (one
# loaded core; recall seconds from docs/bench/recall-T64-*/recall-T256-mix):
#
#   1. MQAR T 64 (4 / 8 pairs), lr 1e-3 / 3e-3 / 1e-2, seed 0, the five new families:
#      15 configurations, 1-6 min each: ~1 core-hour.
#   2. ListOps, cpu preset, seeds 0 and 1: the five new families and gam-delta: 12 runs,
#      4-35 min each (gam-delta's chunked delta rule at head dim 16 is the slow one): ~3
#      core-hours.
#   3. Recall as a rate, T 64 (4 / 8 pairs), 5 seeds x 3 lrs: transformer, transformer-pp,
#      gated-deltanet, gam-delta, mamba and the textbook reference (seed 0 of the new families
#      reused from part 1): ~80 configurations, ~3 min each: ~4.5 core-hours.
#   4. MQAR T 256 (16 / 32 pairs, the short case mixed in), lr 1e-3 / 3e-3, seed 0: the new
#      families and Mamba: 12 configurations, 8-30 min each: ~4 core-hours.
# In all about 12.5 core-hours (~6.5 hours on the two lanes). Cut: T 256 as a rate (3 seeds
# x 2 lrs for 6 families would add ~10 core-hours); T 128.
set -u
cd "$(dirname "$0")/.."  # the repository root
new="transformer-pp gated-deltanet gated-deltanet-matched rwkv7 s4d"
recall=(--threads 1 --device cpu)
run() { echo "== $* $(date)"; .venv/bin/gam bench "$@"; }
lane0() {
  taskset -c 0 bash -c "$(declare -f run)
    run recall ${recall[*]} --models $new --seq-lens 64 --lrs 1e-3 3e-3 1e-2 --out runs/bench/recall-T64-families
    run recall ${recall[*]} --models textbook-transformer transformer transformer-pp --seq-lens 64 --lrs 1e-3 3e-3 1e-2 --seeds 0 1 2 3 4 --out runs/bench/recall-T64-rate
    run recall ${recall[*]} --models $new mamba --seq-lens 256 --num-kv-pairs 16 32 --steps 6000 --tokens-per-step 4096 --lrs 1e-3 3e-3 --out runs/bench/recall-T256-families"
}
lane1() {
  taskset -c 1 bash -c "$(declare -f run)
    run listops --preset cpu --models $new gam-delta --seeds 0 1 --threads 1 --device cpu --out runs/bench/listops-families
    run recall ${recall[*]} --models gated-deltanet gam-delta mamba --seq-lens 64 --lrs 1e-3 3e-3 1e-2 --seeds 0 1 2 3 4 --out runs/bench/recall-T64-rate"
}
lane0 & lane1 & wait
# the combined reports (train nothing)
run recall "${recall[@]}" --models textbook-transformer transformer transformer-pp gated-deltanet gam-delta mamba --seq-lens 64 --lrs 1e-3 3e-3 1e-2 --seeds 0 1 2 3 4 --out runs/bench/recall-T64-rate --report-only
run listops --preset cpu --models $new gam-delta --seeds 0 1 --threads 1 --device cpu --out runs/bench/listops-families  # every run reused
