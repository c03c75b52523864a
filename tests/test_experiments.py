"""The experiment scripts (experiments/*.sh): every job they list is a valid `gam bench` command
line on registered models, and experiments/lanes.sh runs each job of a list exactly once."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gam.bench import build_parser, load_command
from gam.bench.recall_protocol import PRESETS, TEXTBOOK, parse_variant, recall_config
from gam.models.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
ENV = {**os.environ, "PYTHON": sys.executable}


def job_lines(script: str, *args: str) -> list[str]:
    out = subprocess.run(["bash", str(EXPERIMENTS / script), "jobs", *args], env=ENV,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("script", ["controls.sh", "tasks.sh", "long.sh"])
def test_every_job_parses_as_a_bench_command_on_registered_models(script: str) -> None:
    jobs = job_lines(script)
    assert jobs, f"{script} lists no jobs"
    for job in jobs:
        name, *rest = shlex.split(job)
        args = build_parser(name, load_command(name)).parse_args(rest)
        unknown = {spec.split(":")[0] for spec in args.models} - set(MODELS) - {TEXTBOOK}
        assert not unknown, f"{script}: {job!r} names unregistered models {sorted(unknown)}"
        assert args.threads == 1, f"{script}: a lane job must run on one thread: {job!r}"
        if name == "recall":  # a NAME:KEY=VALUE variant must name settings its family has
            for spec in args.models:
                recall_config(*parse_variant(spec), 64, PRESETS["default"])
    assert len(set(jobs)) == len(jobs), f"{script} lists a job twice"


def test_long_seed_check_reruns_part_of_the_code_grid_at_seed_1_only() -> None:
    grid = job_lines("long.sh", "lm")
    for job in job_lines("long.sh", "seed1"):
        name, *rest = shlex.split(job)
        args = build_parser(name, load_command(name)).parse_args(rest)
        assert args.seeds == [1] and args.datasets == ["python-stdlib"], job
        assert args.threads == 1, job
        # the same configuration as a job of the grid, only the seed differs
        assert job.removesuffix(" --seeds 1") in grid, job


def test_issue_lists_split_the_whole_list() -> None:
    for script in ("controls.sh", "tasks.sh"):
        assert job_lines(script, "24") + job_lines(script, "25") == job_lines(script)


def test_all_lists_the_open_issues_parts_first_and_refuses_an_unknown_mode() -> None:
    # open issues (25, 26) first, the optional extras of the resolved issue 24 last
    parts = [job_lines("controls.sh", "25"), job_lines("tasks.sh", "25"), job_lines("long.sh"),
             job_lines("controls.sh", "24"), job_lines("tasks.sh", "24")]
    assert job_lines("all.sh") == [job for part in parts for job in part]
    # an unknown mode must not start the grid (it would run beside a running one)
    result = subprocess.run(["bash", str(EXPERIMENTS / "all.sh"), "job"], env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage" in result.stderr


def test_lanes_run_each_job_once_and_go_on_after_a_failure(tmp_path: Path) -> None:
    log = tmp_path / "ran.txt"
    fake = tmp_path / "gam"  # stands in for the gam command: records its arguments
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n[ "$3" != fail ]\n')
    fake.chmod(0o755)
    jobs = [f"job{i} arg{i}" for i in range(7)] + ["job fail"]
    listing = "\n".join(["# a comment", "", *jobs[:4], "   ", *jobs[4:]]) + "\n"
    result = subprocess.run(["bash", str(EXPERIMENTS / "lanes.sh")], input=listing, text=True,
                            env={**ENV, "GAM": str(fake), "LANES": "0 0"},
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ran = sorted(log.read_text().splitlines())
    assert ran == sorted(f"bench {job}" for job in jobs)
    assert "failed with status" in result.stdout
    assert "all 8 jobs done" in result.stdout
