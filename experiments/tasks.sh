#!/usr/bin/env bash
# Issues 24 and 25: the synthetic tasks of the new families beside the old ones, and recall as
# a rate over seeds and learning rates (issue 24, item 7). Default init, one thread per run.
# One job per (task, model[, seed]), run by experiments/lanes.sh on both cores; resumable:
# every (model, length, lr, seed) of `gam bench recall` and every (model, seed) of
# `gam bench listops` is its own record, reused when finished, resumed from its last
# checkpoint when interrupted, so an interrupted session re-runs this script.
# `bash experiments/tasks.sh jobs 24` (or 25) prints one issue's job list only, `prepare` copies
# the records the rate reuses (experiments/all.sh does both and joins the lists).
#
# The parts, issue 24's first, with their estimated cost on one loaded core (recall seconds
# from docs/bench/recall-T64-*/recall-T256-mix):
#   issue 24
#   - recall as a rate, T 64 (4 / 8 pairs), 5 seeds x 3 lrs: the textbook reference,
#     transformer, transformer-pp, gated-deltanet, gam-delta, mamba, gated-deltanet with
#     gam-delta's heads, and the learned positions swapped (gam-delta without them,
#     gated-deltanet with them: the one input part the two delta-rule families do not share)
#     and gam-delta without its memory bank (which of GAM's parts carries its rate)
#     (seed 0 of the new families copied from recall-T64-families): ~140 configurations,
#     ~1 min each for the Transformers, 3-6 min for the delta rules: ~6.5 h;
#   - ListOps, cpu preset, seeds 0 and 1: transformer-pp, both gated-deltanet sizes and
#     gam-delta (its chunked delta rule at head dim 16 is the slow one): ~2 h;
#   - MQAR T 256 (16 / 32 pairs, the short case mixed in), lr 1e-3 / 3e-3, seed 0:
#     transformer-pp, both gated-deltanet sizes and mamba: 8 configurations, 8-30 min each: ~2.5 h.
#   issue 25
#   - ListOps, seeds 0 and 1: rwkv7 and s4d: ~1 h;
#   - MQAR T 256: rwkv7 and s4d: ~1.5 h.
# In all about 13.5 core-hours. MQAR T 64 of the new families (seed 0, 3 lrs) is measured
# (runs/bench/recall-T64-families). Cut: T 256 as a rate (3 seeds x 2 lrs for 6 families would
# add ~10 core-hours); T 128.
set -u
cd "$(dirname "$0")/.."  # the repository root
recall="recall --threads 1 --device cpu"
rate="--seq-lens 64 --lrs 1e-3 3e-3 1e-2 --seeds 0 1 2 3 4 --out runs/bench/recall-T64-rate"
long="--seq-lens 256 --num-kv-pairs 16 32 --steps 6000 --tokens-per-step 4096 --lrs 1e-3 3e-3 --out runs/bench/recall-T256-families"
listops="listops --preset cpu --threads 1 --device cpu --out runs/bench/listops-families"
# gated-deltanet's heads at d 64 are 6 of d_k 8 (3/4 of d_model split 6 ways); the variant has
# gam-delta's heads and state (4 heads of d_k 16 x d_v 16), so the two differ only in the rest
rate_models="textbook-transformer transformer transformer-pp gated-deltanet gam-delta mamba gated-deltanet:delta_heads=4,delta_head_dim=16,expand_v=1 gam-delta:pos_embedding=false gam-delta-no-bank gated-deltanet:pos_embedding=true"
listops_models="transformer-pp gated-deltanet gated-deltanet-matched gam-delta rwkv7 s4d"

reuse_seed0() {  # seed 0 of the new families at T 64 is part 1 of the rate: the same records
  mkdir -p runs/bench/recall-T64-rate/configs
  local f
  for f in runs/bench/recall-T64-families/configs/{transformer-pp,gated-deltanet}-T64-lr*.json; do
    [ -e "$f" ] && cp -n "$f" runs/bench/recall-T64-rate/configs/
  done
  return 0
}
jobs24() {
  local m s
  for m in $rate_models; do echo "$recall --models $m $rate"; done
  for s in 0 1; do for m in transformer-pp gated-deltanet gated-deltanet-matched gam-delta; do
    echo "$listops --models $m --seeds $s"; done; done
  for m in transformer-pp gated-deltanet gated-deltanet-matched mamba; do echo "$recall --models $m $long"; done
}
jobs25() {
  local m s
  for s in 0 1; do for m in rwkv7 s4d; do echo "$listops --models $m --seeds $s"; done; done
  for m in rwkv7 s4d; do echo "$recall --models $m $long"; done
}
report() {  # the combined reports (train nothing)
  local gam=${GAM:-.venv/bin/gam}
  $gam bench $recall --models $rate_models $rate --report-only
  $gam bench $recall --models transformer-pp gated-deltanet gated-deltanet-matched rwkv7 s4d mamba $long --report-only
  $gam bench $listops --models $listops_models --seeds 0 1 --report-only
}
case ${1:-run} in
  prepare) reuse_seed0 ;;
  jobs) case ${2:-all} in 24) jobs24 ;; 25) jobs25 ;; *) jobs24; jobs25 ;; esac ;;
  report) report ;;
  run) reuse_seed0; { jobs24; jobs25; } | bash experiments/lanes.sh && report ;;
  *) echo "usage: $0 [run|prepare|jobs [24|25]|report]" >&2; exit 2 ;;
esac
