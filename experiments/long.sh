#!/usr/bin/env bash
# Issue 26: long-context language modelling and passkey retrieval (`gam bench long`), every
# registered main family (gam, gam-delta, transformer, transformer-pp, mamba, gated-deltanet,
# rwkv7, s4d), protocol `long` (d_model 128, 4 layers, bf16, lr 1e-3):
# - lm: each family at T 1024 and 4096 on python-stdlib, WikiText-2 and Austen, 150 steps of
#   8,192 tokens = 1,228,800 training tokens of the corpus alone per configuration (48 runs);
# - passkey: each family at T 4096 on WikiText-2, 1,500 steps of one 4,096-token block, 90% of
#   the blocks packed with passkey samples (8 runs; docs/results.md "Long context" says why
#   the language-modelling runs cannot teach the passkey at this size).
#
# Estimated cost (speeds measured on the first runs, 2-core EPYC VM, one thread per run:
# gam 8,400, transformer 5,800, transformer-pp 5,500, gam-delta 4,500-4,800 tokens/s at T 1024
# and 4096; ~4,000 assumed for the others): lm ~4.5 core-hours (1.23M tokens per run, ~5
# minutes each with its evaluation), passkey ~3 core-hours (6.1M tokens per run, ~20 minutes);
# about 7.5 core-hours, 3.8 h on the two lanes.
# Cut to fit 10-15 core-hours: T 8192 (another ~12 core-hours alone, attention at 8,192 on one
# core), d 256 (~2.5x the time), one seed only, 1.2M instead of ~5M tokens per language-model
# run (the models are far from converged: compare families at equal budget, not to the
# literature), passkey runs at T 4096 only (evaluated at 512 to 8,192 tokens) and on one
# corpus, 5 instead of 10+ passkey prompts per cell.
#
# One job per (family, corpus) of the lm part and one per family of the passkey part, run by
# experiments/lanes.sh on both cores, one thread each; resumable: finished runs and
# evaluations are reused and unfinished runs resumed, so an interrupted session re-runs this
# script. The combined report is written at the end (--report-only).
# `bash experiments/long.sh jobs [lm|passkey]` prints the job list only (experiments/all.sh
# joins the lists).
set -u
cd "$(dirname "$0")/.."  # the repository root
common="long --threads 1 --data-dir ../shared/data --quiet --contexts 1024 4096 --out runs/bench/long"
datasets="python-stdlib wikitext2 austen"
registered=$(${PYTHON:-.venv/bin/python} -c "from gam.bench.long import default_families; print(*default_families())")

lm_jobs() {
  local d m
  for d in $datasets; do for m in $registered; do echo "$common --parts lm --models $m --datasets $d"; done; done
}
passkey_jobs() {
  local m
  for m in $registered; do echo "$common --parts passkey --models $m"; done
}
jobs() {  # python-stdlib's lm runs, then the passkey runs, then the other corpora
  case ${1:-all} in
    lm) lm_jobs ;;
    passkey) passkey_jobs ;;
    all) lm_jobs | grep -e "--datasets python-stdlib"; passkey_jobs
         lm_jobs | grep -v -e "--datasets python-stdlib" ;;
    *) echo "usage: $0 jobs [lm|passkey]" >&2; exit 2 ;;
  esac
}
report() {
  # shellcheck disable=SC2086 # the lists are words
  ${GAM:-.venv/bin/gam} bench $common --datasets $datasets --report-only
}
case ${1:-run} in
  jobs) jobs "${2:-all}" ;;
  report) report ;;
  run) jobs | bash experiments/lanes.sh && report ;;
  *) echo "usage: $0 [run|jobs [lm|passkey]|report]" >&2; exit 2 ;;
esac
