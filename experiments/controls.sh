#!/usr/bin/env bash
# Issues 24 and 25: the new families beside the four of Table 1, under the same protocol
# (default init, cpu protocol, 2 epochs of WikiText-2 = 1,250 steps, whole validation split).
# The old rows (gam, transformer, mamba, gam-delta; docs/bench/table1-wikitext2) stand: same
# protocol, so only the new families train here.
#
# Cost, one run alone on one thread: about 15-35 core-minutes per family and seed (cpu-small,
# bf16), so the whole grid (5 families x 3 seeds) is about 6 core-hours; seed 0 first (about
# 2 core-hours), then seeds 1 and 2. Two lanes, one per core (taskset), one thread each;
# resumable: `gam bench compare` reuses finished runs and resumes unfinished ones, and a run
# another process trains is locked, so an interrupted session re-runs this script.
set -u
cd "$(dirname "$0")/.."  # the repository root
common=(--preset cpu --epochs 2 --max-steps none --threads 1 --device cpu --data-dir ../shared/data --quiet)
out=runs/bench/table1-wikitext2-controls
run() { echo "== $* $(date)"; .venv/bin/gam bench "$@"; }
seeds=${SEEDS:-0 1 2}
lane0() {
  taskset -c 0 bash -c "$(declare -f run)
    for s in $seeds; do
      run compare ${common[*]} --models gated-deltanet transformer-pp s4d --seeds \$s --datasets wikitext2 --out $out
    done"
}
lane1() {
  taskset -c 1 bash -c "$(declare -f run)
    for s in $seeds; do
      run compare ${common[*]} --models gated-deltanet-matched rwkv7 --seeds \$s --datasets wikitext2 --out $out
    done"
}
lane0 & lane1 & wait
# the combined report (trains nothing)
run compare "${common[@]}" --models gated-deltanet gated-deltanet-matched transformer-pp rwkv7 s4d \
  --seeds $seeds --datasets wikitext2 --out $out --report-only
