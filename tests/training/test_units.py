"""Unit tests of the training building blocks: data order, schedule, weight decay, configs,
checkpoint files, gate statistics."""

from __future__ import annotations

import json
import math
import random
from dataclasses import fields

import numpy as np
import pytest
import torch

from gam import build_model
from gam.models.blocks import OptimizerHint
from gam.models.io import CheckpointError
from gam.training import (
    DataConfig,
    EpochBatchSampler,
    RunConfig,
    RuntimeOptions,
    TokenizerConfig,
    TrainConfig,
    TrainingState,
    WarmupCosine,
    epoch_permutation,
    find_checkpoint,
    gate_statistics,
    load_checkpoint,
    parameter_groups,
    save_checkpoint,
)
from gam.training.checkpoint import capture_rng_state, load_into, restore_rng_state
from gam.training.optim import build_optimizer, build_scheduler, retarget_schedule
from gam.training.options import setting_flag, setting_key
from gam.training.step import train_step


# ------------------------------------------------------------------------------- data order
def test_epoch_permutation_is_a_function_of_seed_and_epoch():
    a = epoch_permutation(100, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    np.testing.assert_array_equal(a, epoch_permutation(100, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_permutation(100, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_permutation(100, seed=4, epoch=0))


def test_rank_shards_partition_the_global_batches_and_resume_skips_exactly():
    n, batch = 103, 8
    full = list(EpochBatchSampler(n, batch, seed=1, epoch=2))
    assert len(full) == n // batch  # the incomplete last batch is dropped
    assert all(len(b) == batch for b in full)
    shards = [list(EpochBatchSampler(n, batch, seed=1, epoch=2, rank=r, world_size=4))
              for r in range(4)]
    for i, global_batch in enumerate(full):
        assert sum((s[i] for s in shards), []) == global_batch
    resumed = list(EpochBatchSampler(n, batch, seed=1, epoch=2, start_batch=5))
    assert resumed == full[5:]
    with pytest.raises(ValueError, match="not divisible"):
        EpochBatchSampler(n, 6, seed=1, epoch=0, world_size=4)


# --------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_to_min():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(14) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))
    assert WarmupCosine(0, 10)(0) == pytest.approx(1.0)
    assert WarmupCosine(100, 10)(9) == pytest.approx(0.1)  # a run shorter than the warm-up


class _HintedModule(torch.nn.Module):
    """A family-agnostic stand-in: ``slow`` capped at ``cap``, no weight decay."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap
        self.fast = torch.nn.Linear(3, 3)
        self.slow = torch.nn.Parameter(torch.zeros(3, 3))

    def forward(self, x):
        return self.fast(x) @ self.slow

    def optimizer_hints(self):
        return {"slow": OptimizerHint(lr_max=self.cap, weight_decay=0.0)}


@pytest.mark.parametrize("cap", [1e-3, 1e-2])
def test_a_capped_group_keeps_its_cap_through_the_schedule(tmp_path, cap):
    """The rule: at every step the capped group's lr is min(lr, cap) / lr times the run's
    (warm-up, cosine, min_lr floor, a retargeted schedule, a resumed checkpoint)."""
    torch.manual_seed(0)
    model = _HintedModule(cap)
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=3, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    main, capped = opt.param_groups
    assert [main["weight_decay"], capped["weight_decay"]] == [0.1, 0.0]
    assert capped["params"] == [model.slow]
    ratio = min(cfg.lr, cap) / cfg.lr
    f = WarmupCosine(3, 10, 0.1)

    def check(step):
        assert main["lr"] == pytest.approx(cfg.lr * f(step), rel=1e-12)
        assert capped["lr"] == pytest.approx(ratio * main["lr"], rel=1e-12)

    for step in range(6):  # through the warm-up into the cosine
        check(step)
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    folder = save_checkpoint(tmp_path, model, opt, sched, TrainingState(step=6),
                             [capture_rng_state()])
    resumed = _HintedModule(cap)
    opt2 = build_optimizer(resumed, cfg)
    sched2 = build_scheduler(opt2, cfg, 10)
    load_into(load_checkpoint(folder), resumed, opt2, sched2)
    main, capped = opt2.param_groups
    check(6)
    assert torch.equal(opt2.state[resumed.slow]["exp_avg"], opt.state[model.slow]["exp_avg"])
    retarget_schedule(sched2, 20)
    f = WarmupCosine(3, 20, 0.1)
    check(6)
    for step in range(7, 21):
        sched2.step()
        check(step)
    assert capped["lr"] == pytest.approx(ratio * cfg.min_lr)


# ----------------------------------------------------------------------------- weight decay
def test_decay_filters():
    model = build_model("gam", "tiny", init="paper")  # tied: the head is the embedding
    (everything,) = parameter_groups(model, 0.1, "all")
    assert everything["weight_decay"] == 0.1
    assert len(everything["params"]) == len(list(model.parameters()))

    decay, no_decay = parameter_groups(model, 0.1, "nanogpt")
    assert no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    block = model.blocks[0]
    for p in (model.head.weight, model.token_embedding.weight, model.pos_embedding.weight,
              model.ln_f.weight, model.ln_f.bias, block.gate.bias, block.ln1.weight):
        assert id(p) in ids(no_decay)
    for p in (block.memory_bank, block.gate.weight, block.causal_conv.weight,
              block.ffn.fc1.weight):
        assert id(p) in ids(decay)
    assert len(ids(decay) | ids(no_decay)) == len(list(model.parameters()))


def test_a_parameter_flagged_on_the_tensor_only_is_refused():
    """A flag set on the parameter tensor is lost when FSDP replaces the parameter: the
    ``nanogpt`` filter refuses it (naming the parameter) rather than decay it silently there."""
    model = build_model("gam", "tiny")
    model.blocks[1].gate.weight._no_weight_decay = True
    with pytest.raises(ValueError, match=r"parameter blocks\.1\.gate\.weight is flagged "
                                         r"_no_weight_decay on the tensor"):
        parameter_groups(model, 0.1, "nanogpt")
    assert len(parameter_groups(model, 0.1, "all")) == 1  # which decays everything anyway


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size"), (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"),
    (dict(epochs=0), "epochs"), (dict(max_steps=-5), "max_steps"), (dict(lr=float("nan")), "lr"),
    (dict(dtype="fp8"), "dtype"), (dict(decay_filter="some"), "decay_filter"),
    (dict(betas=(0.9, 1.5)), "betas"), (dict(grad_clip=-1.0), "grad_clip"),
])
def test_train_config_rejects_bad_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_run_config_round_trip():
    run = RunConfig(model="transformer", model_preset="tiny", model_arg={"dropout": 0.0},
                    data=DataConfig("austen", max_train_rows=10, use_hub=False),
                    tokenizer=TokenizerConfig(kind="paper", on_all_splits=True),
                    train=TrainConfig(batch_size=4, betas=(0.8, 0.9)))
    values = json.loads(json.dumps(run.to_dict()))
    assert values["model_arg"] == {"dropout": 0.0} and values["data"]["use_hub"] is False
    assert values["tokenizer"]["kind"] == "paper"
    back = RunConfig.from_dict(values)
    assert back == run
    with pytest.raises(ValueError, match="--vocab-size"):
        RunConfig(model_arg={"vocab_size": 100})


def test_a_config_written_under_the_old_names_reads_as_the_new_one():
    new = RunConfig(model_preset="tiny", model_arg={"num_memory_slots": 8}).to_dict()
    old = {("preset" if k == "model_preset" else "model_overrides" if k == "model_arg" else k): v
           for k, v in new.items()}
    assert RunConfig.from_dict(old).to_dict() == new


# a tokenizer field that names the model's size too keeps its own name (the model's)
SHARED_WITH_THE_MODEL = {"vocab_size"}


@pytest.mark.parametrize("section, cls", [(None, RunConfig), ("data", DataConfig),
                                          ("tokenizer", TokenizerConfig),
                                          ("train", TrainConfig), (None, RuntimeOptions)])
def test_every_setting_has_one_name(section, cls):
    """The field (config.json's entry), the flat key (option dest, protocol override) and the
    flag are one name; a tokenizer field's key and flag carry the section (tokenizer.kind:
    tokenizer_kind, --tokenizer-kind)."""
    for f in fields(cls):
        if not f.metadata:  # a section (RunConfig.data, ...)
            continue
        name = f"tokenizer_{f.name}" if section == "tokenizer" \
            and f.name not in SHARED_WITH_THE_MODEL else f.name
        assert setting_key(f) == name, f"{cls.__name__}.{f.name}"
        if setting_flag(f):  # "": a setting without an option
            assert setting_flag(f) == "--" + name.replace("_", "-"), f"{cls.__name__}.{f.name}"


# ------------------------------------------------------------------------------ checkpoints
def _save_one(tmp_path, step):
    model = build_model("gam", "tiny")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(2, 10))
    return save_checkpoint(tmp_path, model, opt, sched, TrainingState(step=step),
                           [capture_rng_state()])


def test_checkpoint_swap_and_fallback(tmp_path):
    first = _save_one(tmp_path, 3)
    second = _save_one(tmp_path, 6)
    assert not first.exists()  # replaced, not accumulated
    assert find_checkpoint(tmp_path) == second
    (tmp_path / "checkpoint" / ".tmp-step-00000009-abc").mkdir()  # a save killed midway
    (tmp_path / "checkpoint" / "latest.json").write_text("{trunc")  # a torn pointer
    assert find_checkpoint(tmp_path) == second
    ckpt = load_checkpoint(second)
    assert ckpt.state.step == 6 and len(ckpt.rng_states) == 1


def test_truncated_checkpoint_file_is_named(tmp_path):
    folder = _save_one(tmp_path, 3)
    opt_file = folder / "optimizer.pt"
    opt_file.write_bytes(opt_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(folder)


def test_rng_state_round_trip(tmp_path):
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(), random.random())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------------------------- gates
def test_gate_statistics_match_a_hand_computation():
    torch.manual_seed(0)
    model = build_model("gam", "tiny").eval()
    batches = [torch.randint(0, 256, (2, 16)) for _ in range(3)]
    stats = gate_statistics(model, [(x, x) for x in batches])
    assert [s["layer"] for s in stats] == [0, 1]
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            values = {"local": [], "global": []}
            for x in batches:
                _, inputs = model.hidden_states(x, output_all=True)
                g = torch.sigmoid(block.gate(block.ln1(inputs[layer]))).double()
                local, global_ = g.chunk(2, dim=-1)
                values["local"].append(local.flatten())
                values["global"].append(global_.flatten())
            for path, chunks in values.items():
                v = torch.cat(chunks)
                assert stats[layer][f"{path}_mean"] == pytest.approx(float(v.mean()), abs=1e-9)
                assert stats[layer][f"{path}_std"] == pytest.approx(
                    float(v.std(unbiased=False)), abs=1e-9)
            assert stats[layer]["tokens"] == 3 * 2 * 16
    assert model.training is False


def test_gate_statistics_of_models_without_gates():
    x = [torch.randint(0, 256, (1, 8))]
    assert gate_statistics(build_model("transformer", "tiny"), x) == []
    assert gate_statistics(build_model("gam-sum", "tiny"), x) == []
    local_only = gate_statistics(build_model("gam", "tiny", use_global=False), x)
    assert set(local_only[0]) == {"layer", "local_mean", "local_std", "tokens"}
    assert math.isfinite(local_only[0]["local_mean"])


def test_train_step_takes_micro_batches_of_different_lengths():
    torch.manual_seed(0)
    model = build_model("transformer", "tiny", dropout=0.0)
    x1, x2 = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (3, 5))
    # the reference: the mean of the two micro-batches' losses, by hand
    l1, l2 = model(x1, x1)[1], model(x2, x2)[1]
    ((l1 + l2) / 2).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay
    grads = {}
    optimizer.step = lambda: grads.update(  # read the gradients train_step steps with
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    loss, _ = train_step(model, optimizer, [x1, x2], [x1, x2])
    assert loss == pytest.approx((l1.item() + l2.item()) / 2, rel=1e-5)
    assert grads.keys() == expected.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, expected[n], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="micro-batch lists"):
        train_step(model, optimizer, [x1, x2], [x1])
    with pytest.raises(ValueError, match="micro-batch lists"):
        train_step(model, optimizer, [x1], [x1], grad_accum=2)


def test_data_dir_has_one_home_and_resolving_it_changes_no_input(tmp_path, monkeypatch):
    assert "data_dir" not in {f.name for f in fields(RuntimeOptions)}
    monkeypatch.chdir(tmp_path)
    run = RunConfig(model="gam", model_preset="tiny")
    moved = run.with_data_dir("data")
    assert moved.data.data_dir == str(tmp_path / "data")
    assert run.data.data_dir is None and moved.train is run.train
    assert run.with_data_dir(None) is run
