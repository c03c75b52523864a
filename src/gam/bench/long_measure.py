"""``gam bench long``'s measurements on a trained model, run in its evaluation worker: loss by
position bucket (with standard errors across windows), passkey accuracy by length and depth,
decode speed after a T-token context, and training speed and peak memory at (batch, T)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from gam.bench.throughput import time_steps
from gam.constants import IGNORE_INDEX
from gam.data.passkey import PasskeyGenerator, score_answer
from gam.models.registry import config_class, model_from_config
from gam.runtime import autocast_context, synchronize
from gam.training.config import TrainConfig
from gam.training.evaluate import token_losses
from gam.training.optim import build_optimizer
from gam.training.step import train_step

POSITION_EDGES = (4, 16, 64, 256, 1024, 4096, 16384, 65536)  # 4, 16: around GAM's reach, 13


def standard_error(values: np.ndarray) -> float | None:
    """The standard error of the mean of ``values`` (None below two)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


# one-sided, 2.5 standard errors: about a 5% chance that noise alone passes one of six buckets
CONTEXT_USED_Z = 2.5


def context_used(buckets: list[dict[str, Any]], z: float = CONTEXT_USED_Z) -> int | None:
    """The last position of the farthest bucket whose loss is below the bucket before it by
    more than ``z`` standard errors of the paired drop (the first bucket's last position when
    none is: no token beyond the first few helps measurably); None without the paired
    drops."""
    if not any("drop" in b for b in buckets):
        return None
    used = buckets[0]["last"] if buckets else None
    for b in buckets[1:]:
        drop, se = b.get("drop"), b.get("drop_se")
        if drop is not None and se is not None and drop > z * se:
            used = b["last"]
    return used


@torch.no_grad()
def truncated_losses(model: torch.nn.Module, ids: Any, seq_len: int, keep: int,
                     batch_size: int = 8, dtype: str = "fp32",
                     device: torch.device | None = None) -> np.ndarray:
    """The loss of every target ``j >= 2 keep`` of each evaluation window (the windows of
    ``evaluate_by_position``: window ``b`` predicts ``ids[b T + j + 1]`` from its ``j + 1``
    tokens) predicted instead from only its last ``keep + 1`` to ``2 keep`` tokens: the
    window cut into chunks of ``2 keep`` tokens every ``keep`` tokens, each scoring its second
    half. (windows, T) float64, NaN for the targets not scored and past the end of ``ids``."""
    ids = np.asarray(ids, dtype=np.int64)
    device = device or next(model.parameters()).device
    windows = -(-max(len(ids) - 1, 0) // seq_len)
    out = np.full((windows, seq_len), np.nan)
    starts = [(b, m) for b in range(windows) for m in range(1, seq_len // keep - 1)]
    was_training = model.training
    model.eval()
    try:
        for at in range(0, len(starts), batch_size):
            batch = starts[at:at + batch_size]
            x = torch.zeros(len(batch), 2 * keep, dtype=torch.long)
            y = torch.full((len(batch), 2 * keep), IGNORE_INDEX, dtype=torch.long)
            for row, (b, m) in enumerate(batch):
                s = b * seq_len + m * keep
                chunk = torch.from_numpy(ids[s:s + 2 * keep + 1])
                if len(chunk) > 1:  # a chunk past the end of the stream scores nothing
                    x[row, :len(chunk) - 1] = chunk[:-1]
                    y[row, :len(chunk) - 1] = chunk[1:]
            with autocast_context(device, dtype):
                losses = token_losses(model, x.to(device), y.to(device)).double().cpu()
            losses = losses.masked_fill(y == IGNORE_INDEX, float("nan")).numpy()
            for row, (b, m) in enumerate(batch):
                out[b, (m + 1) * keep:(m + 2) * keep] = losses[row, keep:]
    finally:
        model.train(was_training)
    return out


def context_gains(block_losses: Any, truncated: dict[int, Any]) -> list[dict[str, Any]]:
    """Per kept context ``k`` (``truncated``: k -> :func:`truncated_losses`): how much higher
    the loss of the same targets is with only their last k+1..2k tokens than with the whole
    window before them (more than 2k tokens), ``gain`` (nats / token), its standard error
    across windows ``se`` (each window's own mean difference: the targets of a window are
    not independent), and the ``windows`` and ``tokens`` compared. A gain above noise: tokens
    further back than about k still lower the loss. For a model with learned absolute
    positions the truncated target also sits at an earlier position, so its gain mixes the
    two; with relative positions or none it is the context alone."""
    full = np.asarray(block_losses, dtype=np.float64)
    out = []
    for keep in sorted(truncated):
        diff = np.asarray(truncated[keep], dtype=np.float64) - full
        has = ~np.isnan(diff).all(axis=1)
        means = np.array([np.nanmean(row) for row in diff[has]])
        out.append({"keep": keep, "gain": float(means.mean()) if len(means) else None,
                    "se": standard_error(means), "windows": int(has.sum()),
                    "tokens": int((~np.isnan(diff)).sum())})
    return out


def farthest_help(gains: list[dict[str, Any]], z: float = CONTEXT_USED_Z) -> int | None:
    """The largest kept context ``k`` whose gain exceeds ``z`` standard errors (tokens more
    than about k back help), 0 when none does, None without gains."""
    if not gains:
        return None
    helped = [g["keep"] for g in gains
              if g["gain"] is not None and g["se"] is not None and g["gain"] > z * g["se"]]
    return max(helped, default=0)


def position_buckets(loss_sum: Any, tokens: Any, edges: tuple[int, ...] | list[int]
                     = POSITION_EDGES, block_losses: Any = None) -> list[dict[str, Any]]:
    """Per-position loss sums and target counts (index i: targets predicted from i + 1 tokens)
    summed into the buckets 1..edges[0], edges[0]+1..edges[1], ... up to the window length:
    ``first``, ``last`` (1-based positions), ``loss_sum``, ``tokens`` and their mean
    ``loss``. With ``block_losses`` (windows x positions, NaN for no target) also ``se``, the
    standard error of the bucket's loss across windows (the spread of the windows' own
    means in the bucket: neighbouring tokens are not independent, windows nearly are),
    ``windows``, how many had a target there, and from the second bucket on ``drop`` and
    ``drop_se``: how much lower the loss is here than in the bucket before, paired within each
    window (the mean over windows of their own difference, and its standard error), which is
    the test of whether the tokens further back still help."""
    loss_sum = np.asarray(loss_sum, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.int64)
    blocks = None if block_losses is None else np.asarray(block_losses, dtype=np.float64)
    out, first, before = [], 1, None
    for edge in [*edges, len(loss_sum)]:
        last = min(edge, len(loss_sum))
        if last < first:
            break
        s, n = float(loss_sum[first - 1:last].sum()), int(tokens[first - 1:last].sum())
        bucket = {"first": first, "last": last, "loss_sum": s, "tokens": n,
                  "loss": s / n if n else None}
        if blocks is not None:
            part = blocks[:, first - 1:last]
            has = ~np.isnan(part).all(axis=1)
            window_means = np.full(len(blocks), np.nan)
            if has.any():
                window_means[has] = np.nanmean(part[has], axis=1)
            means = window_means[has]
            bucket["windows"] = int(has.sum())
            bucket["se"] = standard_error(means)
            if before is not None:
                diff = (before - window_means)[has & ~np.isnan(before)]
                bucket["drop"] = float(diff.mean()) if len(diff) else None
                bucket["drop_se"] = standard_error(diff)
            before = window_means
        out.append(bucket)
        first = last + 1
    return out


def extended_model(model: torch.nn.Module, name: str, max_seq_len: int
                   ) -> tuple[torch.nn.Module | None, str | None]:
    """``model`` rebuilt with a longer ``max_seq_len`` and the same weights, or ``(None,
    reason)`` when it has learned positions (none exist past its T) or its weights depend on
    the length."""
    if max_seq_len <= model.config.max_seq_len:
        return model, None
    if getattr(model, "pos_embedding", None) is not None:
        return None, f"learned positions end at {model.config.max_seq_len}"
    config = config_class(name).from_dict({**model.config.to_dict(),
                                           "max_seq_len": max_seq_len})
    longer = model_from_config(name, config)
    try:
        longer.load_state_dict(model.state_dict())
    except RuntimeError as exc:
        return None, f"weights depend on max_seq_len ({str(exc)[:120]})"
    return longer.to(next(model.parameters()).device).eval(), None


@torch.no_grad()
def passkey_accuracy(model: torch.nn.Module, name: str, tokenizer: Any, seq_len: int,
                     evaluation: dict[str, Any], seed: int, device: torch.device
                     ) -> list[dict[str, Any]]:
    """One record per (length, depth): ``correct`` of ``n`` greedy answers; ``status`` ok,
    ``n/a`` (no positions past T) or ``too short`` (the key and question do not fit)."""
    generator = PasskeyGenerator(tokenizer)
    rng = np.random.default_rng([seed, 26])
    n, new = evaluation["passkey_samples"], evaluation["generated_tokens"]
    cells = []
    for factor in evaluation["passkey_lengths"]:
        length = int(round(factor * seq_len))
        net, reason = extended_model(model, name, length)
        for depth in evaluation["passkey_depths"]:
            cell: dict[str, Any] = {"length": length, "factor": factor, "depth": depth,
                                    "status": "ok"}
            cells.append(cell)
            prompt_len = length - new
            if net is None:
                cell.update(status="n/a", reason=reason)
                continue
            if prompt_len < generator.overhead():
                cell.update(status="too short", reason=f"the key sentence and the question "
                            f"take {generator.overhead()} tokens")
                continue
            keys = [generator.random_key(rng) for _ in range(n)]
            prompts = [generator.sample(prompt_len, depth, key) for key in keys]
            x = torch.tensor([p.ids for p in prompts], dtype=torch.long, device=device)
            out = net.generate(x, new, temperature=0)[:, prompt_len:].tolist()
            answers = [tokenizer.decode(row) for row in out]
            correct = sum(score_answer(a, k) for a, k in zip(answers, keys, strict=True))
            cell.update(correct=correct, n=n, accuracy=correct / n,
                        key_positions=[p.key_position for p in prompts],
                        example={"key": keys[0], "answer": answers[0]})
    return cells


@torch.no_grad()
def decode_speed(model: torch.nn.Module, context: torch.Tensor, steps: int,
                 device: torch.device) -> dict[str, Any]:
    """Greedy cached decoding after ``context`` (1, T'): tokens/s over ``steps`` timed steps
    (median step time; the prefill untimed)."""
    logits, cache = model.prefill(context.to(device))
    token = logits.argmax(-1)
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        logits, cache = model.step(token, cache)
        token = logits.argmax(-1)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"decode_tokens_per_s": 1.0 / statistics.median(times),
            "decode_context": int(context.shape[1]), "decode_steps": steps}


def training_speed(model: torch.nn.Module, ids: np.ndarray, seq_len: int, batch: int,
                   dtype: str, steps: int, device: torch.device) -> dict[str, Any]:
    """Median tokens/s and peak memory growth of ``steps`` training steps (after one untimed)
    at (batch, seq_len) on validation windows. It trains the model: run it last."""
    need = batch * seq_len + 1
    window = np.resize(np.asarray(ids, dtype=np.int64), need)  # repeated when the split is short
    x = torch.from_numpy(window[:-1].reshape(batch, seq_len).copy()).to(device)
    y = torch.from_numpy(window[1:].reshape(batch, seq_len).copy()).to(device)
    config = TrainConfig(lr=1e-4)
    optimizer = build_optimizer(model, config)
    model.train()

    def step() -> None:
        train_step(model, optimizer, x, y, dtype=dtype, grad_clip=config.grad_clip)

    _, step_s, _, meter = time_steps(step, device, {"warmup": 1, "steps": steps,
                                                    "model": model.model_name})
    return {"step_tokens_per_s": batch * seq_len / statistics.median(step_s),
            "step_ms": statistics.median(step_s) * 1e3, "steps_timed": len(step_s),
            "peak_mem_mb": meter.growth_bytes() / 2**20, "memory_method": meter.method}
