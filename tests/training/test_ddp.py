"""Two processes (torchrun, gloo on CPU) with the same global batch follow the single-process
loss curve."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from gam.training import read_metrics

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_two_process_ddp_matches_one_process(tmp_path, data_dir, tiny_args, gam_subprocess):
    extra = ("--max-steps", "5", "--dropout", "0", "--save-every", "2", "--eval-every", "3",
             "--device", "cpu")
    single = tmp_path / "single"
    one = gam_subprocess(tiny_args(data_dir, single, *extra, "--threads", "1"))
    assert one.returncode == 0, one.stderr

    double = tmp_path / "ddp"
    two = gam_subprocess(["-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "gam",
                          *tiny_args(data_dir, double, *extra)], module=False, timeout=300)
    assert two.returncode == 0, two.stderr
    # rank 0 alone prints the summary and writes the run directory
    summaries = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["step"] == 5

    config = json.loads((double / "config.json").read_text())
    assert config["schedule"]["world_size"] == 2
    assert config["schedule"]["per_process_batch_size"] == 4

    loss = lambda run: [r["loss"] for r in read_metrics(run, kind="train")]  # noqa: E731
    val = lambda run: [r["val_loss"] for r in read_metrics(run, kind="eval")]  # noqa: E731
    assert len(loss(double)) == 5
    assert loss(double) == pytest.approx(loss(single), rel=1e-4)
    assert val(double) == pytest.approx(val(single), rel=1e-4)
    assert len(read_metrics(double, kind="train")) == 5  # no duplicate records from rank 1


def test_global_batch_must_divide_over_processes(tmp_path, data_dir, tiny_args, gam_subprocess):
    out = tmp_path / "bad"
    res = gam_subprocess(["-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "gam",
                          *tiny_args(data_dir, out, "--batch-size", "7", "--max-steps", "1")],
                         module=False, timeout=300)
    assert res.returncode != 0
    assert "not divisible by the number of processes 2" in res.stderr
