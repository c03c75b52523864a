#!/usr/bin/env bash
# Issue 26: long-context language modelling (`gam bench long`): every registered main family
# (gam, gam-delta, transformer, transformer-pp, mamba, gated-deltanet, rwkv7, s4d) at T 1024
# and 4096 on Austen, WikiText-2 and python-stdlib, protocol `long` (d_model 128, 4 layers,
# 150 steps of 8,192 tokens = 1,228,800 training tokens per configuration, 5% passkey blocks).
#
# Estimated cost: about 13 core-hours (6.5 h on the two lanes) for the 48 configurations:
# training ~11 h (1.23M tokens per run at ~1,500 tokens/s on average on one core, d 128 bf16;
# `gam bench throughput` per family on the shared, loaded 2-core VM, T 1024 / 4096: gam 3,000 /
# 2,900, s4d 1,850 / 3,860, mamba 1,870 / 2,440, transformer 1,420 / 1,110, gam-delta 1,190 /
# 1,170 tokens/s; ~1,200 assumed for the families not yet measured), plus ~2 h of
# evaluation (the runs' own validation, loss by position, 5 passkey prompts per (length,
# depth) cell at 0.25/0.5/1/2 T, decode and timed steps). Families not registered when it
# runs are left out (about 2 core-hours less per missing family).
# Measured on the first runs (2026-12-05, docs/results.md "Long context"): 3-6x faster than the
# estimate above (gam 8,400, transformer-pp 5,500, gam-delta 4,500-4,800 tokens/s), so about
# 3-4 core-hours; and at this budget no model learns the passkey (the grid waits on that).
# Cut to fit 10-15 core-hours: T 8192 (another ~12 core-hours alone, attention at 8,192 on
# one core), d 256 (~2.5x the time), one seed only, 1.2M instead of ~5M tokens per run
# (the models are far from converged: compare families at equal budget, not to the
# literature), 5 instead of 10+ passkey prompts per cell, and no passkey-free control runs
# (the perplexities are those of models trained with 5% passkey blocks; validation is on the
# corpus alone).
#
# One job per (family, corpus), run by experiments/lanes.sh on both cores, one thread each;
# resumable: finished runs and evaluations are reused and unfinished runs resumed, so an
# interrupted session re-runs this script. The combined report is written at the end
# (--report-only). `bash experiments/long.sh jobs` prints the job list only (experiments/all.sh
# joins the lists).
set -u
cd "$(dirname "$0")/.."  # the repository root
common="long --threads 1 --data-dir ../shared/data --quiet --contexts 1024 4096 --out runs/bench/long"
datasets="python-stdlib wikitext2 austen"
registered=$(${PYTHON:-.venv/bin/python} -c "from gam.bench.long import default_families; print(*default_families())")

jobs() {
  local d m
  for d in $datasets; do for m in $registered; do echo "$common --models $m --datasets $d"; done; done
}
report() {
  # shellcheck disable=SC2086 # the lists are words
  ${GAM:-.venv/bin/gam} bench $common --datasets $datasets --report-only
}
case ${1:-run} in
  jobs) jobs ;;
  report) report ;;
  run) jobs | bash experiments/lanes.sh && report ;;
  *) echo "usage: $0 [run|jobs|report]" >&2; exit 2 ;;
esac
