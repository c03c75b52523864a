"""FSDP2 (``--strategy fsdp``) with two processes (torchrun, gloo on CPU): the single-process
loss curve, sharded checkpoints (torch.distributed.checkpoint) with the gathered whole model
beside them, and a resume after SIGKILL that continues bit for bit."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import gam
from gam.models.blocks import flagged_no_weight_decay
from gam.models.io import CheckpointError
from gam.training import (
    RunConfig,
    TrainConfig,
    find_checkpoint,
    load_checkpoint,
    read_metrics,
)
from gam.training.checkpoint import TrainingState, capture_rng_state
from gam.training.distributed import DistContext
from gam.training.fsdp import SHARDED, load_sharded_into, save_sharded_checkpoint
from gam.training.optim import build_optimizer, build_scheduler, parameter_groups

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


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone, and its one-device mesh (CPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _names(model: torch.nn.Module, groups: list[dict]) -> list[list[str]]:
    """The parameter names of each optimizer group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in groups]


def _group_names(model: torch.nn.Module, decay_filter: str) -> list[list[str]]:
    return _names(model, parameter_groups(model, 0.1, decay_filter, lr=3e-4))


def _sharded(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """``model`` sharded as ``shard_model`` does (which leaves one process's model whole)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)



# per family, the parameters of a block it keeps out of weight decay (``no_weight_decay_names``)
FLAGGED = {
    "mamba": {"mixer.A_log", "mixer.D"},
    "gated-deltanet": {"mixer.A_log", "mixer.dt_bias"},
    "rwkv7": {f"att.{n}" for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2", "r_k")},
    "s4d": {"ssm.log_dt", "ssm.log_A_real", "ssm.A_imag"},
}


@pytest.mark.parametrize("name", sorted(FLAGGED))
def test_flagged_parameters_stay_out_of_weight_decay_under_fsdp(name, one_process_group):
    """``fully_shard`` replaces every parameter by a new (DTensor) one: the parameters a family
    keeps out of weight decay (Mamba's A_log, a 2-D one among them) must still be in the
    ``nanogpt`` filter's no-decay group, and every group as without FSDP, in the same order."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    kwargs = {"ssm_lr": None} if name == "s4d" else {}  # no hints: the filter decides alone
    model = gam.build_model(name, "tiny", **kwargs)
    expected = {f: _group_names(model, f) for f in ("all", "nanogpt")}
    flagged = {f"blocks.{i}.{n}" for i in range(model.config.n_layers) for n in FLAGGED[name]}
    flagged.discard("blocks.0.att.v1")  # RWKV-7's layer 0 has no value LoRA
    flagged.discard("blocks.0.att.v2")
    assert flagged <= set(expected["nanogpt"][1])
    _sharded(model, one_process_group)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in flagged_no_weight_decay(model)} == flagged
    assert {f: _group_names(model, f) for f in expected} == expected


def test_an_fsdp_run_resumes_with_its_own_optimizer_groups(one_process_group, tmp_path,
                                                            monkeypatch, caplog):
    """An FSDP run recorded before the flags were read by name (its mamba A_log in the decayed
    group) resumes with the groups it was trained with, hyperparameters and moments whole, and
    says so; ``set_state_dict`` alone would leave a group without lr or betas."""
    cfg = TrainConfig(decay_filter="nanogpt", weight_decay=0.1, lr=1e-3, warmup_steps=1)

    def sharded_mamba() -> torch.nn.Module:
        torch.manual_seed(0)
        return _sharded(gam.build_model("mamba", "tiny"), one_process_group)

    model = sharded_mamba()
    with monkeypatch.context() as m:  # the groups as built before the fix
        m.setattr(gam.training.optim, "flagged_no_weight_decay", lambda model: [])
        optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10)
    recorded = _names(model, optimizer.param_groups)
    assert "blocks.0.mixer.A_log" in recorded[0]
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    model(x, x)[1].backward()
    optimizer.step()
    scheduler.step()
    save_sharded_checkpoint(tmp_path, model, optimizer, scheduler, TrainingState(step=1),
                            [capture_rng_state()], DistContext())

    resumed = sharded_mamba()
    optimizer2 = build_optimizer(resumed, cfg)
    assert _names(resumed, optimizer2.param_groups) != recorded
    scheduler2 = build_scheduler(optimizer2, cfg, 10)
    with caplog.at_level(logging.WARNING, logger="gam.training"):
        load_sharded_into(load_checkpoint(find_checkpoint(tmp_path)), resumed, optimizer2,
                          scheduler2)
    assert _names(resumed, optimizer2.param_groups) == recorded
    assert "resuming with the run's own groups" in caplog.text
    assert "blocks.0.mixer.A_log" in caplog.text
    for before, after in zip(optimizer.param_groups, optimizer2.param_groups, strict=True):
        assert {k: v for k, v in before.items() if k != "params"} == \
            {k: v for k, v in after.items() if k != "params"}
    a_log = resumed.blocks[0].mixer.A_log
    assert torch.equal(optimizer2.state[a_log]["exp_avg"].full_tensor(),
                       optimizer.state[model.blocks[0].mixer.A_log]["exp_avg"].full_tensor())
    resumed(x, x)[1].backward()
    optimizer2.step()  # every group has its hyperparameters

    # other groups than the run's (here the "all" filter's one) are refused, in one line
    other = sharded_mamba()
    with pytest.raises(CheckpointError, match=r"does not match the model or optimizer "
                                              r"\(parameters per optimizer group: \[13\] read, "
                                              r"\[27\] expected\)$"):
        load_sharded_into(load_checkpoint(find_checkpoint(tmp_path)), other,
                          build_optimizer(other, TrainConfig(decay_filter="all")))
