#!/usr/bin/env bash
# Issues 24 and 25: the new families beside the four of Table 1, under the same protocol
# (default init, cpu protocol, 2 epochs of WikiText-2 = 1,250 steps, whole validation split).
# The old rows (gam, transformer, mamba, gam-delta; docs/bench/table1-wikitext2) stand: same
# protocol, so only the new families train here.
#
# Cost: one run is about 40-55 minutes on one loaded core (cpu-small, bf16), so the grid
# (5 families x 3 seeds) is about 11 core-hours; issue 24's families (both Gated DeltaNet sizes,
# transformer-pp) come first, seed by seed, then issue 25's (rwkv7, s4d). One job per (family,
# seed), run by experiments/lanes.sh on both cores; resumable: `gam bench compare` reuses
# finished runs and resumes unfinished ones, so an interrupted session re-runs this script.
# `bash experiments/controls.sh jobs 24` (or 25) prints one issue's job list only (experiments/all.sh joins lists).
set -u
cd "$(dirname "$0")/.."  # the repository root
common="--preset cpu --epochs 2 --max-steps none --threads 1 --device cpu --data-dir ../shared/data --quiet --datasets wikitext2"
out=runs/bench/table1-wikitext2-controls
seeds=${SEEDS:-0 1 2}
families24="gated-deltanet gated-deltanet-matched transformer-pp"
families25="rwkv7 s4d"

jobs() {  # jobs FAMILIES: one job per (seed, family)
  local s m
  for s in $seeds; do for m in $1; do echo "compare $common --models $m --seeds $s --out $out"; done; done
}
report() {  # the combined report (trains nothing)
  ${GAM:-.venv/bin/gam} bench compare $common --models $families24 $families25 --seeds $seeds --out $out --report-only
}
case ${1:-run} in
  jobs) case ${2:-all} in 24) jobs "$families24" ;; 25) jobs "$families25" ;; *) jobs "$families24"; jobs "$families25" ;; esac ;;
  report) report ;;
  run) { jobs "$families24"; jobs "$families25"; } | bash experiments/lanes.sh && report ;;
  *) echo "usage: $0 [run|jobs [24|25]|report]" >&2; exit 2 ;;
esac
