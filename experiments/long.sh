#!/usr/bin/env bash
# Issue 26: long-context language modelling and passkey retrieval (`gam bench long`), every
# registered main family (gam, gam-delta, transformer, transformer-pp, mamba, gated-deltanet,
# rwkv7, s4d), protocol `long` (d_model 128, 4 layers, bf16, lr 1e-3):
# - lm: each family at T 1024 and 4096 on python-stdlib, WikiText-2 and Austen, 150 steps of
#   8,192 tokens = 1,228,800 training tokens of the corpus alone per configuration (48 runs);
# - passkey: each family at T 1024 on WikiText-2, 2,000 steps of four blocks (8,192,000
#   tokens), 90% of the blocks packed with passkey samples, one key per block (8 runs), asked at
#   128 to 4,096 tokens (past T only for families without learned positions); the budget that
#   taught transformer-pp the copy (docs/results.md "Long context" says why the
#   language-modelling runs cannot teach the passkey at this size, and why not T 4096).
#
# Cost, from the speeds of the python-stdlib runs (2-core EPYC VM, one thread per run, one run
# per core): lm ~1.4 core-hours per corpus, ~4.3 in all; passkey 8.2M tokens per run at the
# families' T 1024 speeds (gam 8,400, transformer 5,800, transformer-pp 5,500, gam-delta
# 4,600 tokens/s, the others between), ~3.5 core-hours with the evaluations; about 8
# core-hours, more than one 3-hour session on two cores: each finished configuration's row is
# kept in docs/bench/long/records (`--records`, committed), which later sessions and machines
# use instead of the run folders they do not have.
# Cut to fit 10-15 core-hours: T 8192 (another ~12 core-hours alone, attention at 8,192 on one
# core), d 256 (~2.5x the time), one seed only, 1.2M instead of ~5M tokens per language-model
# run (the models are far from converged: compare families at equal budget, not to the
# literature), passkey runs at T 1024 only and on one corpus (T 4096 with the same keys per
# step would cost 4x: ~14 core-hours), 5 instead of 10+ passkey prompts per cell.
#
# One job per (family, corpus) of the lm part and one per family of the passkey part, run by
# experiments/lanes.sh on both cores, one thread each; resumable: records, finished runs and
# evaluations are reused and unfinished runs resumed, so an interrupted session re-runs this
# script. The combined report is written at the end (--report-only).
# `bash experiments/long.sh jobs [lm|passkey]` prints the job list only (experiments/all.sh
# joins the lists).
# Seed check: `bash experiments/long.sh jobs seed1 | bash experiments/lanes.sh` trains GAM,
# gam-delta, Gated DeltaNet and RWKV-7 on python-stdlib again at seed 1 (~45 core-minutes), and
# `bash experiments/long.sh report seed1` writes their report to runs/bench/long-seed1.
set -u
cd "$(dirname "$0")/.."  # the repository root
base="long --threads 1 --data-dir ../shared/data --quiet --contexts 1024 4096"
records="--records docs/bench/long/records"
common="$base --out runs/bench/long $records"
datasets="python-stdlib wikitext2 austen"
registered=$(${PYTHON:-.venv/bin/python} -c "from gam.bench.long import default_families; print(*default_families())")

lm_jobs() {
  local d m
  for d in $datasets; do for m in $registered; do echo "$common --parts lm --models $m --datasets $d"; done; done
}
passkey_jobs() {  # transformer-pp first (see above)
  local m
  for m in $registered; do
    if [ "$m" = transformer-pp ]; then echo "$common --parts passkey --models $m"; fi
  done
  for m in $registered; do
    if [ "$m" != transformer-pp ]; then echo "$common --parts passkey --models $m"; fi
  done
}
seed_check="gated-deltanet gam-delta rwkv7 gam"  # slowest first: the lanes stay balanced
seed1_jobs() {
  local m
  for m in $seed_check; do echo "$common --parts lm --models $m --datasets python-stdlib --seeds 1"; done
}
jobs() {  # python-stdlib's lm runs, then the passkey runs, then the other corpora
  case ${1:-all} in
    lm) lm_jobs ;;
    passkey) passkey_jobs ;;
    seed1) seed1_jobs ;;
    all) lm_jobs | grep -e "--datasets python-stdlib"; passkey_jobs
         lm_jobs | grep -v -e "--datasets python-stdlib" ;;
    *) echo "usage: $0 jobs [lm|passkey|seed1]" >&2; exit 2 ;;
  esac
}
report() {
  # shellcheck disable=SC2086 # the lists are words
  case ${1:-all} in
    all) ${GAM:-.venv/bin/gam} bench $common --datasets $datasets --report-only ;;
    seed1) ${GAM:-.venv/bin/gam} bench $base --out runs/bench/long-seed1 $records --parts lm \
             --models $seed_check --datasets python-stdlib --seeds 1 --report-only ;;
    *) echo "usage: $0 report [seed1]" >&2; exit 2 ;;
  esac
}
case ${1:-run} in
  jobs) jobs "${2:-all}" ;;
  report) report "${2:-all}" ;;
  run) jobs | bash experiments/lanes.sh && report ;;
  *) echo "usage: $0 [run|jobs [lm|passkey|seed1]|report [seed1]]" >&2; exit 2 ;;
esac
