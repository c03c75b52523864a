#!/usr/bin/env bash
# Issue 12 item 3 / issue 13 WikiText target: Table 1 and Table 3 with the default init
# (untied), 3 seeds, 2 epochs of WikiText-2 at cpu-small; Austen (TinyStories stand-in) for
# Table 1; the paper init beside as one seed; the slot sweep with one seed. One process at a
# time on both threads, so the seconds per epoch are each model alone on the machine.
# Resumable: gam bench compare / ablate reuse finished runs and resume unfinished ones.
set -u
cd "$(dirname "$0")/.."  # the repository root
common=(--preset cpu --epochs 2 --max-steps none --threads "${THREADS:-2}" --data-dir ../shared/data --quiet)
run() { echo "== $* $(date)"; .venv/bin/gam bench "$@"; }
run compare "${common[@]}" --models gam transformer mamba gam-delta --seeds 0 1 2 \
  --datasets wikitext2 --out runs/bench/table1-wikitext2
run ablate "${common[@]}" --seeds 0 1 2 --out runs/bench/table3
run compare "${common[@]}" --models gam transformer mamba gam-delta --seeds 0 --datasets wikitext2 \
  --model-arg init=paper --out runs/bench/table1-wikitext2-paper-init
run compare "${common[@]}" --models gam transformer mamba gam-delta --seeds 0 1 2 \
  --datasets austen --out runs/bench/table1-austen
run ablate "${common[@]}" --seeds 0 --model-arg init=paper --out runs/bench/table3-paper-init
run ablate "${common[@]}" --variants gam --slots 128 256 512 1024 --seeds 0 --out runs/bench/slots
echo "== done $(date)"
