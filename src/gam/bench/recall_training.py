"""Training and evaluation of one ``gam bench recall`` configuration (model, length, lr,
seed) on MQAR batches, with the plain-data checkpoints of ``gam.bench.tasks``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from gam.bench.recall_protocol import (
    Protocol,
    batch_size,
    build_recall_model,
    stream_seed,
)
from gam.bench.tasks import key_text, load_checkpoint, save_checkpoint
from gam.bench.textbook_transformer import TextbookConfig
from gam.constants import IGNORE_INDEX
from gam.data.mqar import make_mqar_batch, query_distances
from gam.models.registry import (
    count_parameters,
)
from gam.training.config import TrainConfig
from gam.training.optim import build_optimizer, build_scheduler
from gam.training.step import NonFiniteError, train_step

__all__ = ["evaluate", "key_text", "load_checkpoint", "save_checkpoint", "train_config"]


@torch.no_grad()
def evaluate(model, seq_len: int, pairs: int, vocab_size: int, n_examples: int, seed: int,
             device: torch.device, batch_size: int = 128, random_non_queries: bool = True,
             power_a: float | None = None) -> dict[str, Any]:
    """Accuracy on the query positions of ``n_examples`` held-out sequences, and the key
    distance of every query."""
    was_training = model.training
    model.eval()
    correct = total = 0
    distances = []
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < n_examples:
        b = min(batch_size, n_examples - done)
        x, y = make_mqar_batch(b, seq_len, pairs, vocab_size, generator=gen,
                               random_non_queries=random_non_queries, power_a=power_a)
        logits, _ = model(x.to(device))
        mask = y != IGNORE_INDEX
        pred = logits.argmax(-1).cpu()
        correct += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
        distances.append(query_distances(x, y, pairs))
        done += b
    model.train(was_training)
    return {"accuracy": correct / total, "queries": total,
            "distances": torch.cat(distances)}


def train_config(name: str, overrides: dict[str, Any], seq_len: int, pairs: list[int],
                 lr: float, p: Protocol, seed: int, device: torch.device, log=print,
                 checkpoint: Path | None = None, key: Any = None,
                 mix: list[list[Any]] = ()) -> dict[str, Any]:
    """Train one model at one length and lr on the mixture of ``pairs``; return its
    validation curve, final validation and test accuracy per pair count.

    ``mix`` (``mix_for_length``): shorter ``[length, pair counts]`` cases trained beside, each
    step one micro-batch of ``tokens_per_step / 2`` tokens per mixed length, weighted like the
    configuration's own batch (zoology's original MQAR set mixes lengths 64 to 256 the same
    way); validation, the early stop and the test are on ``seq_len`` only.

    ``checkpoint``: a file the training state (model, optimizer, schedule, data stream, curve)
    is written to at every validation and resumed from if it holds the same ``key``, so an
    interrupted configuration continues where it stopped (the same numbers as an
    uninterrupted one); it is removed once the configuration has finished."""
    torch.manual_seed(seed)  # the same initial weights for every lr of a model
    model = build_recall_model(name, overrides, seq_len, p).to(device).train()
    per_pair = batch_size(p, seq_len, len(pairs)) // len(pairs)
    cfg = TrainConfig(batch_size=per_pair * len(pairs), lr=lr, weight_decay=p.weight_decay,
                      decay_filter="nanogpt",
                      warmup_steps=max(1, round(p.warmup_fraction * p.steps)), grad_clip=1.0,
                      seed=seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, p.steps)
    # the same training stream for every model and lr at this length
    gen = torch.Generator().manual_seed(stream_seed("train", seed, seq_len))

    def validate() -> dict[int, float]:
        return {q: evaluate(model, seq_len, q, p.vocab_size, p.val_examples,
                            stream_seed("valid", seed, seq_len, q), device,
                            random_non_queries=p.random_filler,
                            power_a=p.query_power_a)["accuracy"] for q in pairs}

    def draw(n_seq: int, length: int, pair_counts: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_seq`` training sequences of ``length`` per pair count, concatenated."""
        parts = [make_mqar_batch(n_seq, length, q, p.vocab_size, generator=gen,
                                 random_non_queries=p.random_filler, power_a=p.query_power_a)
                 for q in pair_counts]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    curve: list[dict[str, Any]] = []
    train_seconds, stop_reason, step, loss_value = 0.0, "steps", 0, math.nan
    t_start = time.perf_counter()
    state = load_checkpoint(checkpoint, key)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        curve, train_seconds, step, loss_value = (state["curve"], state["train_seconds"],
                                                  state["step"], state["loss"])
        log(f"    {name} T {seq_len} lr {lr:g}: resumed at step {step}")
    while step < p.steps:
        step += 1
        t0 = time.perf_counter()
        # its own batch, then one micro-batch per shorter length of the mix
        micro = [draw(per_pair, seq_len, pairs)] + [
            draw(max(4, p.tokens_per_step // 2 // m // len(m_pairs)), m, m_pairs)
            for m, m_pairs in mix]
        xs, ys = [x for x, _ in micro], [y for _, y in micro]
        try:  # gam train's step: loss, backward, clipping, AdamW, schedule
            loss_value, _ = train_step(model, optimizer, xs, ys, scheduler=scheduler,
                                       grad_clip=cfg.grad_clip)
        except NonFiniteError as exc:
            raise FloatingPointError(f"{exc} at step {step}") from exc
        train_seconds += time.perf_counter() - t0
        out_of_time = p.max_seconds is not None and train_seconds >= p.max_seconds
        if step % p.eval_every == 0 or step == p.steps or out_of_time:
            val = validate()
            curve.append({"step": step, "train_loss": loss_value, "train_seconds": train_seconds,
                          "val_accuracy": {str(q): a for q, a in val.items()}})
            log(f"    {name} T {seq_len} lr {lr:g} step {step}: loss {loss_value:.3f}, "
                f"validation " + ", ".join(f"P{q} {100 * a:.1f}%" for q, a in val.items())
                + f", {train_seconds:.0f} s")
            if min(val.values()) >= p.target_accuracy:
                stop_reason = "target accuracy"
                break
            if out_of_time:
                stop_reason = "time limit"
                break
            if checkpoint is not None and step < p.steps:
                save_checkpoint(checkpoint, {
                    "key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "stream": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "curve": curve,
                    "train_seconds": train_seconds, "step": step, "loss": loss_value})
    rf = int(model.receptive_field)
    final_val = {int(q): a for q, a in curve[-1]["val_accuracy"].items()}
    test = {}
    for q in pairs:
        ev = evaluate(model, seq_len, q, p.vocab_size, p.test_examples,
                      stream_seed("test", seed, seq_len, q), device,
                      random_non_queries=p.random_filler, power_a=p.query_power_a)
        test[str(q)] = {"accuracy": ev["accuracy"], "queries": ev["queries"],
                        "reachable_fraction": float((ev["distances"] <= rf - 1).float().mean()),
                        "val_accuracy": final_val[q]}
    if isinstance(model.config, TextbookConfig):
        parameters = sum(t.numel() for t in model.parameters())
    else:
        parameters = count_parameters(model)["total"]
    return {"status": "ok", "steps": step, "stop_reason": stop_reason,
            "train_seconds": train_seconds, "run_seconds": time.perf_counter() - t_start,
            "final_loss": loss_value, "batch_size": cfg.batch_size,
            "val_accuracy": sum(final_val.values()) / len(final_val),
            "receptive_field": rf, "parameters": parameters, "pairs": test, "curve": curve,
            "model_config": model.config.to_dict()}
