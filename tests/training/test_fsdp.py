"""FSDP2 (``--strategy fsdp``) with two processes (torchrun, gloo on CPU): the single-process
loss curve, sharded checkpoints (torch.distributed.checkpoint) with the gathered whole model
beside them, and a resume after SIGKILL that continues bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import gam
from gam.models.io import CheckpointError
from gam.training import (
    RunConfig,
    TrainConfig,
    find_checkpoint,
    load_checkpoint,
    read_metrics,
)
from gam.training.fsdp import SHARDED, load_sharded_into
from gam.training.optim import build_optimizer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(),
                                reason="finds torchrun's ranks in /proc")

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gam")


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run, kind="train")]


def _val_losses(run: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run, kind="eval")]


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts each rank in a session of its own, so a
    process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def _kill_tree(pid: int) -> None:
    for member in _process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, data_dir, tiny_args, gam_subprocess):
    """A finished two-process FSDP run (2 micro-batches per step) and the one-process run of
    the same settings."""
    root = tmp_path_factory.mktemp("fsdp")
    # 59 validation blocks, 30 on rank 0 and 29 on rank 1: in batches of 29, rank 1 has one
    # batch fewer and must still take part in rank 0's second forward
    extra = ("--max-steps", "5", "--dropout", "0", "--save-every", "2", "--eval-every", "3",
             "--eval-batch-size", "29", "--device", "cpu", "--threads", "1")
    single = root / "single"
    one = gam_subprocess(tiny_args(data_dir, single, *extra))
    assert one.returncode == 0, one.stderr
    sharded = root / "fsdp"
    two = gam_subprocess([*TORCHRUN, *tiny_args(data_dir, sharded, *extra, "--strategy", "fsdp",
                                                      "--grad-accum", "2")],
                         module=False, timeout=300)
    assert two.returncode == 0, two.stderr
    summaries = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["step"] == 5  # rank 0 only
    return single, sharded


def test_fsdp_follows_the_single_process_losses(fsdp_run):
    single, sharded = fsdp_run
    config = json.loads((sharded / "config.json").read_text())
    assert config["train"]["strategy"] == "fsdp"
    assert config["schedule"]["world_size"] == 2
    assert len(_losses(sharded)) == 5  # no duplicate records from rank 1
    # each rank averages its half of the batch (over two micro-batches) and the gradients are
    # averaged over the ranks: the same numbers summed in another order, equal to float rounding
    assert _losses(sharded) == pytest.approx(_losses(single), rel=1e-5)
    assert _val_losses(sharded) == pytest.approx(_val_losses(single), rel=1e-5)
    # the gate statistics were computed (by both ranks: a sharded forward is collective; on
    # other batches than the single process's, those of the per-process batch size)
    layers = lambda run: [len(r["gates"]) for r in read_metrics(run, kind="eval")]  # noqa: E731
    assert layers(sharded) == layers(single) and min(layers(single)) > 0
    tokens = lambda run: [r["val_tokens"] for r in read_metrics(run, kind="eval")]  # noqa: E731
    assert tokens(sharded) == tokens(single)


def test_fsdp_checkpoint_is_sharded_with_the_whole_model_beside(fsdp_run):
    single, sharded = fsdp_run
    folder = find_checkpoint(sharded)
    shards = sorted(p.name for p in (folder / SHARDED).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    ckpt = load_checkpoint(folder)
    assert ckpt.state.step == 5 and ckpt.optimizer is None and ckpt.scheduler is not None
    assert len(ckpt.rng_states) == 2

    # the whole model, gathered on rank 0, in the run folder and the checkpoint
    whole = load_file(str(sharded / "model.safetensors"))
    assert whole.keys() == load_file(str(folder / "model.safetensors")).keys()
    assert all(torch.equal(v, load_file(str(folder / "model.safetensors"))[k])
               for k, v in whole.items())
    model = gam.load_pretrained(sharded)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in gam.load_pretrained(single).parameters())

    # DCP reshards on load: the two ranks' shards load into one unsharded model, equal to the
    # gathered weights, with the AdamW state of step 5
    run = RunConfig.from_dict(json.loads((sharded / "config.json").read_text()))
    plain = gam.load_pretrained(sharded)
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    optimizer = build_optimizer(plain, run.train)
    load_sharded_into(ckpt, plain, optimizer)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in whole.items())
    assert all(int(s["step"]) == 5 for s in optimizer.state.values())


def test_fsdp_run_resumes_in_one_process(fsdp_run, tmp_path, gam_subprocess):
    _, sharded = fsdp_run
    run = tmp_path / "copy"
    shutil.copytree(sharded, run, ignore=shutil.ignore_patterns(".lock"))
    res = gam_subprocess(["train", "--resume", str(run), "--max-steps", "6", "--quiet"])
    assert res.returncode == 0, res.stderr
    assert "resuming with 1" in res.stderr  # the dropout streams of the ranks cannot continue
    assert "Warning" not in res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == 5 and summary["step"] == 6
    assert _losses(run)[:5] == _losses(sharded) and len(_losses(run)) == 6
    folder = find_checkpoint(run)
    assert load_checkpoint(folder).state.step == 6
    assert sorted(p.name for p in (folder / SHARDED).iterdir()) == [".metadata", "__0_0.distcp"]


def test_a_checkpoint_without_shards_is_refused(fsdp_run, tmp_path):
    _, sharded = fsdp_run
    ckpt = load_checkpoint(find_checkpoint(sharded))
    ckpt.path = tmp_path  # a folder with no sharded/
    model = gam.load_pretrained(sharded)
    with pytest.raises(CheckpointError, match="has no sharded model and optimizer"):
        load_sharded_into(ckpt, model, torch.optim.AdamW(model.parameters()))


def test_fsdp_fp16_is_refused():
    with pytest.raises(ValueError, match=r"--dtype fp16 \(grad scaler\) is not supported with "
                                         r"--strategy fsdp"):
        TrainConfig(strategy="fsdp", dtype="fp16")
    with pytest.raises(ValueError, match="strategy .--strategy. must be one of"):
        TrainConfig(strategy="zero3")


@needs_proc
def test_fsdp_resume_after_sigkill_is_bit_exact(tmp_path, data_dir, tiny_args, gam_subprocess,
                                                kill_at_step):
    steps = 10
    extra = ("--max-steps", str(steps), "--save-every", "3", "--eval-every", "7",
             "--dropout", "0.1", "--device", "cpu", "--threads", "1", "--strategy", "fsdp")
    full = tmp_path / "uninterrupted"
    done = gam_subprocess([*TORCHRUN, *tiny_args(data_dir, full, *extra)], module=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    # torchrun and both ranks, as a machine failure would
    _, reached = kill_at_step([*TORCHRUN, *tiny_args(data_dir, killed, *extra)], killed, 4,
                              lambda proc: _kill_tree(proc.pid))
    assert reached < steps, "the run finished before it could be killed"
    checkpoint_step = load_checkpoint(find_checkpoint(killed)).state.step
    assert 3 <= checkpoint_step <= reached and checkpoint_step % 3 == 0

    (killed / "model.safetensors").unlink()  # rewritten from the gathered checkpoint weights
    resumed = gam_subprocess([*TORCHRUN, "train", "--resume", str(killed), "--quiet"],
                             module=False, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "model.safetensors" in resumed.stderr and "they were missing" in resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == checkpoint_step and summary["step"] == steps
    # same process count, same threads, restored RNG of each rank (dropout on): bit for bit
    assert _losses(killed) == _losses(full)
    assert _val_losses(killed) == _val_losses(full)
