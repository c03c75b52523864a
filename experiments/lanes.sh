#!/usr/bin/env bash
# Runs a list of `gam bench` jobs on the machine's cores, one job per core at a time, each job
# taken by the next free core (so the lanes stay balanced whatever each job costs).
#
#   some-job-list | bash experiments/lanes.sh
#
# A job is one line of arguments to `gam bench` (no quoting: words split on spaces); blank
# lines and lines starting with `#` are skipped. Jobs run in the order listed, so list first
# what is needed first. Jobs on the two lanes must not write the same run (give them disjoint
# models or seeds); every `gam bench` command reuses finished runs and resumes unfinished ones,
# so rerunning the same list after an interruption continues where it stopped.
# LANES="0 1" (default) names the cores; each job runs pinned to its core with the job's own
# --threads. GAM names the gam command (default .venv/bin/gam).
set -u
cd "$(dirname "$0")/.."  # the repository root
gam=${GAM:-.venv/bin/gam}
list=$(mktemp)
counter=$(mktemp)
trap 'rm -f "$list" "$counter"' EXIT
grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' > "$list"
total=$(wc -l < "$list")
echo 1 > "$counter"

next_job() {  # prints the number of the next job to run, under a lock shared by the lanes
  flock "$counter" bash -c 'n=$(cat "$0"); echo $((n + 1)) > "$0"; echo "$n"' "$counter"
}

lane() {  # lane CORE: runs jobs until none is left
  local core=$1 n job
  while n=$(next_job) && [ "$n" -le "$total" ]; do
    job=$(sed -n "${n}p" "$list")
    echo "== [core $core, job $n/$total] gam bench $job ($(date))"
    # shellcheck disable=SC2086 # a job is words
    taskset -c "$core" $gam bench $job ||
      echo "== [core $core, job $n/$total] failed with status $? ($(date))"
  done
}

for core in ${LANES:-0 1}; do
  lane "$core" &
done
wait
echo "== all $total jobs done ($(date))"
