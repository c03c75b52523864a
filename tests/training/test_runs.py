"""Whole training runs on real data (tiny model): run directory, evaluation, divergence,
gradient accumulation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gam
from gam.cli import main
from gam.data import TokenBlocks, encode_corpus, load_corpus
from gam.training import evaluate, find_checkpoint, load_checkpoint, load_run, read_metrics
from gam.training.rundir import LOCK_FILE, RunBusyError, training_lock


def test_run_directory_contents(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "model.json", "model.safetensors",
            "tokenizer.json", "checkpoint"} <= names

    config = json.loads((trained_run / "config.json").read_text())
    for key in ("model", "model_preset", "model_config", "data", "tokenizer", "train",
                "gam_version", "torch_version"):
        assert key in config
    assert config["model"] == "gam" and config["model_preset"] == "tiny"
    assert config["model_config"]["vocab_size"] == 512
    assert config["model_config"]["dropout"] == 0.1
    assert config["data"]["dataset"] == "wikitext2" and config["data"]["seq_len"] == 64
    assert config["tokenizer"]["kind"] == "bytelevel"
    assert config["train"]["lr"] == 3e-4 and config["train"]["betas"] == [0.9, 0.95]
    assert config["train"]["weight_decay"] == 0.1 and config["train"]["decay_filter"] == "all"

    train = read_metrics(trained_run, kind="train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert {"step", "loss", "lr", "epoch", "tokens_per_s"} <= set(r)
    evals = read_metrics(trained_run, kind="eval")
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert {"step", "epoch", "val_loss", "val_ppl", "epoch_time_s", "tokens_per_s",
                "gates"} <= set(r)
        assert r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
        assert len(r["gates"]) == 2
        assert {"local_mean", "local_std", "global_mean", "global_std"} <= set(r["gates"][0])

    ckpt = load_checkpoint(find_checkpoint(trained_run))
    assert ckpt.state.step == 6 and ckpt.state.threads == 1  # reused by --resume
    model = gam.load_pretrained(trained_run)
    assert isinstance(model, gam.GAMLM)


def test_token_weighted_eval_matches_a_hand_computation(trained_run, data_dir):
    model, tokenizer, config = load_run(trained_run)
    corpus = load_corpus("wikitext2", data_dir, max_train_rows=400, max_val_rows=40)
    ids = encode_corpus(corpus, tokenizer, splits=["valid"])["valid"]
    seq_len = 64
    assert (len(ids) - 1) % seq_len != 0  # the last block is partial: weighting matters

    # by hand: every position t >= 1 of the stream is a target once
    stream = torch.from_numpy(ids.astype("int64"))
    losses = []
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            x = stream[start:start + seq_len][None]
            y = stream[start + 1:start + seq_len + 1][None]
            x = x[:, :y.shape[1]]
            logits, _ = model(x)
            losses.append(F.cross_entropy(logits[0], y[0], reduction="none"))
    per_token = torch.cat(losses).double()
    assert per_token.numel() == len(ids) - 1
    expected = float(per_token.mean())

    for batch_size in (1, 3, 8):
        result = evaluate(model, ids, seq_len, batch_size=batch_size)
        assert result["tokens"] == len(ids) - 1
        assert result["loss"] == pytest.approx(expected, rel=1e-5)
        assert result["ppl"] == pytest.approx(torch.exp(torch.tensor(expected)).item(), rel=1e-5)

    # a mean of batch means would weigh the short last block like a full one
    blocks = TokenBlocks(ids, seq_len, drop_last=False)
    block_means = []
    with torch.no_grad():
        for i in range(len(blocks)):
            x, y = blocks[i]
            _, loss = model(x[None], y[None])
            block_means.append(float(loss))
    assert sum(block_means) / len(block_means) != pytest.approx(expected, rel=1e-7)

    # the run's final evaluation used the same weights and the same rule
    final = read_metrics(trained_run, kind="eval")[-1]
    assert final["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert final["val_tokens"] == len(ids) - 1


def test_nan_loss_stops_keeps_checkpoint_and_exits_nonzero(tmp_path, data_dir, tiny_args,
                                                           capsys):
    out = tmp_path / "nan-run"
    code = main(tiny_args(data_dir, out, "--max-steps", "20", "--save-every", "1", "--lr", "1e6",
                          "--warmup-steps", "0", "--threads", "1"))
    assert code == 3
    err = capsys.readouterr().err
    assert "gam: error: loss is nan" in err and "Traceback" not in err
    assert "last good checkpoint (step 1)" in err
    diverged = read_metrics(out, kind="diverged")
    assert len(diverged) == 1 and diverged[0]["step"] == 2
    ckpt = load_checkpoint(find_checkpoint(out))
    assert ckpt.state.step == 1
    model, _, _ = load_run(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_accum_gives_the_same_curve(tmp_path, data_dir, tiny_args):
    losses = []
    for accum in (1, 4):
        out = tmp_path / f"accum{accum}"
        assert main(tiny_args(data_dir, out, "--max-steps", "4", "--grad-accum", str(accum),
                              "--dropout", "0", "--threads", "1")) == 0
        losses.append([r["loss"] for r in read_metrics(out, kind="train")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_transformer_trains_without_gate_stats(tmp_path, data_dir, tiny_args):
    out = tmp_path / "tf"
    assert main(tiny_args(data_dir, out, "--max-steps", "2", "--threads", "1",
                          model="transformer")) == 0
    (record,) = read_metrics(out, kind="eval")
    assert "gates" not in record
    model, _, config = load_run(out)
    assert config["model"] == "transformer" and isinstance(model, gam.models.TransformerLM)


def test_resume_of_a_finished_run_does_nothing(trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(run), "--quiet", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["resumed_from"] == 6
    after = read_metrics(run)
    assert [r for r in after if r["kind"] != "resume"] == [
        json.loads(line) for line in before.splitlines()]


def test_resume_before_the_first_checkpoint_restarts_identically(trained_run, tmp_path,
                                                                 data_dir):
    run = tmp_path / "no-ckpt"
    shutil.copytree(trained_run, run)
    expected = [(r["step"], r["loss"]) for r in read_metrics(run, kind="train")]
    # what a run killed at step 2, before its first checkpoint (step 3), leaves
    shutil.rmtree(run / "checkpoint")
    for name in ("model.safetensors", "model.json"):
        (run / name).unlink()
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= 2))
    assert main(["train", "--resume", str(run), "--quiet", "--device", "cpu", "--threads", "1",
                 "--data-dir", str(data_dir)]) == 0
    assert [(r["step"], r["loss"]) for r in read_metrics(run, kind="train")] == expected
    assert [r["step"] for r in read_metrics(run, kind="resume")] == []


def test_a_run_being_trained_cannot_be_trained_by_a_second_process(trained_run, tmp_path,
                                                                   capsys):
    run = tmp_path / "busy"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with training_lock(run):  # this process plays the one that trains it
        assert main(["train", "--resume", str(run), "--quiet",
                     "--device", "cpu", "--max-steps", "8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "being trained by another process" in err[0]
        assert f"pid {os.getpid()}" in err[0]
        with pytest.raises(RunBusyError):
            with training_lock(run):
                pass
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != LOCK_FILE} == {
        k: v for k, v in before.items() if k != LOCK_FILE}  # nothing written by the refused run
    with training_lock(run):  # released with the holder
        pass


def test_a_killed_trainer_leaves_no_stale_lock(tmp_path):
    with subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom gam.training.rundir import training_lock\n"
         f"with training_lock({str(tmp_path)!r}):\n    print('locked', flush=True)\n"
         "    time.sleep(60)"], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
                with training_lock(tmp_path):
                    pass
        finally:
            holder.kill()
            holder.wait()
    with training_lock(tmp_path):  # the kernel dropped the dead process's lock
        pass
