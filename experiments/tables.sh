#!/usr/bin/env bash
# Issue 12 item 3 / issue 13 WikiText target: Table 1 and Table 3 with the default init
# (untied), 3 seeds, 2 epochs of WikiText-2 at cpu-small; Austen (TinyStories stand-in) for
# Table 1 (and at 5 epochs, one seed); the paper init beside as one seed; the slot sweep with one
# seed.
#
# Two lanes, one per core (taskset), one thread each: the machine's two cores each train one
# model at a time. Seconds per epoch are not read from these runs (two lanes share the memory
# system); they come from `gam bench throughput` with each model alone (docs/results.md).
# Resumable: gam bench compare / ablate reuse finished runs and resume unfinished ones, so an
# interrupted session re-runs this script. Table 3's full GAM is Table 1's GAM (same protocol,
# seeds and config): linked, not retrained.
set -u
cd "$(dirname "$0")/.."  # the repository root
common=(--preset cpu --epochs 2 --max-steps none --threads 1 --data-dir ../shared/data --quiet)
common5=(--preset cpu --epochs 5 --max-steps none --threads 1 --data-dir ../shared/data --quiet)
run() { echo "== $* $(date)"; .venv/bin/gam bench "$@"; }
t1=runs/bench/table1-wikitext2
t3=runs/bench/table3

link_full_gam() {  # Table 1's finished GAM runs into another folder that trains the same config
  local dest=$1 seeds=$2 src=${3:-$t1} seed
  mkdir -p "$dest/runs/wikitext2"
  for seed in $seeds; do
    [ -e "$src/runs/wikitext2/gam-seed$seed/model.safetensors" ] &&
      ln -sfn "$(realpath "$src/runs/wikitext2/gam-seed$seed")" "$dest/runs/wikitext2/gam-seed$seed"
  done
}

# In order of what the issues need first: Table 1's third seed, Table 3 (3 seeds), Austen,
# the paper init beside, the slot sweep; the lanes are balanced (about equal core-minutes).
# Two commands on one --out never train the same run: their model or seed lists are disjoint,
# and a run another process is training is locked (it is skipped, listed as not run).
lane0() {
  taskset -c 0 bash -c "$(declare -f run)
    run compare ${common[*]} --models gam transformer mamba --seeds 0 1 2 --datasets wikitext2 --out $t1
    run ablate ${common[*]} --variants gam-global-only gam-sum gam-local-only --seeds 0 1 --out $t3
    run compare ${common[*]} --models gam transformer mamba gam-delta --seeds 0 --datasets austen --out $au
    run compare ${common[*]} --models gam transformer mamba gam-delta --seeds 1 2 --datasets austen --out $au
    run compare ${common5[*]} --models gam transformer mamba gam-delta --seeds 0 --datasets austen --out $au5
    run ablate ${common[*]} --variants gam-global-only gam-sum gam-local-only --seeds 0 --model-arg init=paper --out $t3p"
}
lane1() {
  taskset -c 1 bash -c "$(declare -f run)
    run compare ${common[*]} --models gam-delta --seeds 0 1 2 --datasets wikitext2 --out $t1
    run ablate ${common[*]} --variants gam-global-only gam-sum gam-local-only --seeds 2 --out $t3
    run compare ${common[*]} --models gam transformer mamba gam-delta --seeds 0 --datasets wikitext2 --model-arg init=paper --out $t1p
    run ablate ${common[*]} --variants gam --slots 128 256 512 1024 --seeds 0 --out $slots"
}

t1p=runs/bench/table1-wikitext2-paper-init
t3p=runs/bench/table3-paper-init
au=runs/bench/table1-austen
au5=runs/bench/table1-austen-5epochs  # the paper's 5 epochs, one seed: the ranking's budget check
slots=runs/bench/slots
link_full_gam $slots 0  # the default point (cpu-small: 256 slots) is Table 1's GAM, seed 0
lane0 & lane1 & wait
# the combined reports (train nothing; a run an interrupted lane left unfinished is listed as
# not run, and the next run of this script continues it)
link_full_gam $t3 "0 1 2"
link_full_gam $t3p 0 $t1p  # Table 3's full GAM under the paper init is Table 1's paper-init GAM
link_full_gam $slots 0
run compare "${common[@]}" --models gam transformer mamba gam-delta --seeds 0 1 2 --datasets wikitext2 --out $t1 --report-only
run ablate "${common[@]}" --seeds 0 1 2 --out $t3 --report-only
run compare "${common[@]}" --models gam transformer mamba gam-delta --seeds 0 1 2 --datasets austen --out $au --report-only
run compare "${common5[@]}" --models gam transformer mamba gam-delta --seeds 0 --datasets austen --out $au5 --report-only
run compare "${common[@]}" --models gam transformer mamba gam-delta --seeds 0 --datasets wikitext2 --model-arg init=paper --out $t1p --report-only
run ablate "${common[@]}" --seeds 0 --model-arg init=paper --out $t3p --report-only
run ablate "${common[@]}" --variants gam --slots 128 256 512 1024 --seeds 0 --out $slots --report-only
echo "== done $(date)"
