#!/usr/bin/env bash
# Every measurement still open, open issues first: issue 25's Table 1 seeds and tasks, then
# issue 26's long-context grid, then the optional extras of issue 24 (resolved): the recall
# rates without learned positions and without the bank, as one job list on both cores
# (experiments/lanes.sh: each job taken by the next free core, so no lane waits for the other
# between the parts), then every part's combined report. About 13.5 + 7.5 + 11 core-hours for the
# whole grids in that order (the estimates at the top of each script; finished runs are
# reused, so what is left costs less); resumable: rerun it after an interruption.
#   nohup bash experiments/all.sh > runs/all.log 2>&1 &
# `bash experiments/all.sh jobs` prints the joined job list (runs nothing), `report` writes the
# reports only.
set -u
cd "$(dirname "$0")/.."  # the repository root
jobs() {
  bash experiments/controls.sh jobs 25
  bash experiments/tasks.sh jobs 25
  bash experiments/long.sh jobs
  bash experiments/controls.sh jobs 24
  bash experiments/tasks.sh jobs 24
}
report() {
  bash experiments/controls.sh report
  bash experiments/tasks.sh report
  bash experiments/long.sh report
}
case ${1:-run} in
  jobs) jobs ;;
  report) report ;;
  run) bash experiments/tasks.sh prepare; jobs | bash experiments/lanes.sh; report ;;
  *) echo "usage: $0 [run|jobs|report]" >&2; exit 2 ;;
esac
