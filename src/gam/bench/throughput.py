"""``gam bench throughput``: training tokens/s, model FLOP/s and MFU.

One training step is the one ``gam train`` runs, ``gam.training.step.train_step``:
``loss = model(x, y, return_logits=False)`` (the chunked linear cross-entropy; under
``torch.autocast(device, bfloat16)`` for ``--dtype bf16``, the weights staying fp32 as in
mixed-precision training), ``loss.backward()``, gradient clipping at ``TrainConfig``'s default
1.0, ``AdamW.step()`` (``gam.training.optim.build_optimizer``: fused, the paper's betas and
weight decay), ``zero_grad(set_to_none=True)`` on random tokens of shape
(``--batch-size``, seq_len). After ``--warmup`` steps, ``--steps`` steps are timed one by one
(fewer if ``--max-seconds`` would be exceeded; at least 2 are timed); tokens/s = batch x
seq_len / median step time (robust to bursts of other load; ``tokens_per_s_mean`` uses the
total time).

FLOPs: ``gam.bench.flops.flops_per_token`` (training = 3 x forward; see that module for the
convention), so achieved FLOP/s = tokens/s x FLOPs/token. MFU divides it by a matmul peak
measured in the same process for the same dtype (the best of 5 timed loops of a
2048 x 2048 @ 2048 x 2048 matmul with operands in that dtype, measured before and after the
training steps, keeping the best), so MFU is relative to what this machine's BLAS actually
reaches, not to a datasheet number. On a machine shared with other processes the peak and the
training speed are both lowered by the others' load, not necessarily by the same factor; the
achieved FLOP/s does not depend on the peak.

Each (model, dtype, seq_len) runs in its own process (fresh allocator: the peak memory growth
of the timed steps, over the model + optimizer state after warm-up, is reported; on CPU the
worker applies ``gam.runtime.tune_cpu_allocator()`` as ``gam train`` does; a configuration
that runs out of memory or time is recorded, not fatal). ``ratios`` compares GAM and the
Transformer (SDPA) run at the same dtype and length: the measured tokens/s ratio next to the
inverse ratio of their FLOPs per token (what the tokens/s ratio would be if both ran at the same
FLOP/s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gam.bench import common
from gam.bench.flops import flops_breakdown, flops_per_token
from gam.bench.measure import MemoryMeter, default_memory_cap, limit_address_space
from gam.bench.reports import environment_markdown, fmt, markdown_table, new_figure
from gam.bench.workers import emit, merge_worker_result, run_worker, worker_main
from gam.models.registry import build_model, model_config
from gam.runtime import DTYPES, synchronize, tune_cpu_allocator
from gam.training.argtypes import nonneg_int, nonneg_number, positive_int, positive_number
from gam.training.config import TrainConfig
from gam.training.optim import build_optimizer
from gam.training.step import train_step

DEFAULT_MODELS = ["gam", "transformer", "mamba"]
MATMUL_SIZE = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser, DEFAULT_MODELS)
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="sequences per training step (default: %(default)s)")
    parser.add_argument("--seq-len", nargs="+", type=positive_int, default=[256], metavar="T",
                        help="sequence length(s); max_seq_len is raised to it if needed")
    parser.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                        help="bf16 = torch.autocast(device, dtype=torch.bfloat16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps (default 10; quick 3)")
    parser.add_argument("--warmup", type=nonneg_int, default=None,
                        help="untimed steps first (default 2; quick 1)")
    parser.add_argument("--lr", type=positive_number, default=3e-4, help="AdamW learning rate")
    parser.add_argument("--matmul-size", type=positive_int, default=MATMUL_SIZE,
                        help="n of the n x n @ n x n matmul that measures the peak")
    parser.add_argument("--max-seconds", type=positive_number, default=900.0,
                        help="wall-clock limit per configuration (its own process); timing "
                             "stops early after 60%% of it")
    parser.add_argument("--max-memory-gb", type=nonneg_number, default=None,
                        help="CPU: cap on a configuration's extra address space (default: "
                             "85%% of available memory); 0 = no cap")


# ---------------------------------------------------------------------------------- worker
def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = MATMUL_SIZE,
                        rounds: int = 5, min_seconds: float | None = None) -> float:
    """Best FLOP/s over ``rounds`` timed loops (each at least ``min_seconds``, default 0.3 s
    for n >= 1024) of an n x n @ n x n matmul with operands in ``dtype``."""
    if min_seconds is None:
        min_seconds = 0.3 if n >= 1024 else 0.02
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    synchronize(device)
    best = 0.0
    for _ in range(rounds):
        iters, elapsed = 0, 0.0
        t0 = time.perf_counter()
        while elapsed < min_seconds or iters < 2:
            torch.mm(a, b, out=out)
            iters += 1
            if device.type == "cuda" and iters % 10:
                continue
            synchronize(device)
            elapsed = time.perf_counter() - t0
        synchronize(device)
        elapsed = time.perf_counter() - t0
        best = max(best, 2.0 * n**3 * iters / elapsed)
    return best


def time_steps(step: Any, device: torch.device, payload: dict[str, Any]
                ) -> tuple[float, list[float], float, MemoryMeter]:
    """``payload["warmup"]`` untimed steps, then up to ``payload["steps"]`` timed ones (at
    least 2; fewer when the time budget would be exceeded) under a memory meter:
    ``(warm-up seconds, seconds per timed step, timed seconds, meter)``."""
    t_start = time.perf_counter()
    for i in range(payload["warmup"]):
        if i == 0 and payload.get("compile"):
            try:
                step()
            except Exception as exc:
                raise RuntimeError(
                    f"torch.compile of {payload['model']} failed on {device.type} "
                    f"({type(exc).__name__}: {str(exc)[:300]}); run without --compile") from exc
            continue
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - t_start
    budget = payload.get("time_budget_s")
    meter = MemoryMeter(device)
    meter.start()
    steps_done, elapsed, step_s = 0, 0.0, []
    t0 = time.perf_counter()
    while steps_done < payload["steps"]:
        t_step = time.perf_counter()
        step()
        synchronize(device)
        step_s.append(time.perf_counter() - t_step)
        steps_done += 1
        elapsed = time.perf_counter() - t0
        if budget is not None and steps_done >= 2 and warmup_s + elapsed > budget:
            break
    return warmup_s, step_s, elapsed, meter


def _worker(payload: dict[str, Any]) -> None:
    allocator_tuned = tune_cpu_allocator() if payload["device"] == "cpu" else False

    device = torch.device(payload["device"])
    torch.manual_seed(payload.get("seed", 0))
    name, seq_len, batch = payload["model"], payload["seq_len"], payload["batch_size"]
    dtype_name = payload["dtype"]
    dtype = DTYPES[dtype_name]
    peak_before = measure_matmul_peak(device, dtype, payload.get("matmul_size", MATMUL_SIZE))
    overrides = dict(payload.get("overrides", {}))
    base_len = model_config(name, payload["preset"], **overrides).max_seq_len
    overrides["max_seq_len"] = max(base_len, seq_len)
    model = build_model(name, payload["preset"], **overrides).to(device).train()
    fpt = flops_breakdown(model.config, seq_len, training=True)
    params = sum(p.numel() for p in model.parameters())
    # the optimizer `gam train` builds: the paper's AdamW settings, fused where available
    train_config = TrainConfig(lr=payload.get("lr", 3e-4))
    optimizer = build_optimizer(model, train_config)
    net = torch.compile(model) if payload.get("compile") else model
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(payload.get("seed", 0))
    x = torch.randint(vocab, (batch, seq_len), generator=gen).to(device)
    y = torch.randint(vocab, (batch, seq_len), generator=gen).to(device)

    losses = []

    def step() -> None:
        # gam train's step (gam.training.step): chunked loss under autocast, backward,
        # gradient clipping, AdamW step, zero_grad
        loss, _ = train_step(net, optimizer, x, y, dtype=dtype_name,
                             grad_clip=train_config.grad_clip)
        losses.append(loss)

    if device.type == "cpu":
        limit_address_space(payload.get("max_memory_bytes"))
    warmup_s, step_s, elapsed, meter = time_steps(step, device, payload)
    steps_done = len(step_s)
    tokens_per_s = batch * seq_len / statistics.median(step_s)
    achieved = tokens_per_s * fpt["total"]
    peak_mem = meter.growth_bytes()
    # measured again after training: the best of both is closer to what the machine can do
    # when other processes share it
    peak_after = measure_matmul_peak(device, dtype, payload.get("matmul_size", MATMUL_SIZE))
    peak_runs = [peak_before, peak_after]
    peak = max(peak_runs)
    emit({
        "status": "ok",
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_mean": batch * seq_len * steps_done / elapsed,
        "step_ms": statistics.median(step_s) * 1e3,
        "step_ms_min": min(step_s) * 1e3,
        "step_ms_all": [t * 1e3 for t in step_s],
        "steps_timed": steps_done,
        "warmup_s": warmup_s,
        "flops_per_token": fpt["total"],
        "flops_breakdown": {k: v for k, v in fpt.items() if k != "total"},
        "achieved_flops": achieved,
        "peak_flops": peak,
        "peak_flops_runs": peak_runs,
        "mfu": achieved / peak,
        "peak_mem_mb": peak_mem / 2**20,
        "memory_method": meter.method,
        "parameters": params,
        "final_loss": losses[-1],
        "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused")
                                                 else ""),
        "malloc_tuned": allocator_tuned,
    })


# ------------------------------------------------------------------------------------ run
def ratio_rows(runs: list[dict[str, Any]], a: str = "gam", b: str = "transformer"
               ) -> list[dict[str, Any]]:
    ok = {(r["model"], r["dtype"], r["seq_len"], r["batch_size"], r["compile"]): r
          for r in runs if r["status"] == "ok"}
    rows = []
    for (model, dtype, seq_len, batch, comp), ra in ok.items():
        if model != a:
            continue
        rb = ok.get((b, dtype, seq_len, batch, comp))
        if rb is None:
            continue
        rows.append({"models": f"{a}/{b}", "dtype": dtype, "seq_len": seq_len,
                     "batch_size": batch, "compile": comp,
                     "tokens_per_s_ratio": ra["tokens_per_s"] / rb["tokens_per_s"],
                     "inverse_flops_ratio": rb["flops_per_token"] / ra["flops_per_token"],
                     "inverse_flops_ratio_causal": (rb.get("flops_per_token_causal")
                                                    or rb["flops_per_token"])
                     / (ra.get("flops_per_token_causal") or ra["flops_per_token"]),
                     "mfu_" + a: ra["mfu"], "mfu_" + b: rb["mfu"]})
    return rows


def _markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    parts = [f"# gam bench throughput: training tokens/s (preset {s['preset']}, batch "
             f"{s['batch_size']}, AdamW, compile {s['compile']}"
             f"{common.overrides_text(s['overrides'])})", "",
             environment_markdown(results["environment"], results["command"]), "",
             markdown_table(
                 ["model", "dtype", "T", "status", "tokens/s", "median step (ms)",
                  "MFLOP/token", "achieved GFLOP/s", "matmul peak GFLOP/s", "MFU",
                  "peak mem (MB)"],
                 [[r["model"], r["dtype"], r["seq_len"], r["status"],
                   fmt(r.get("tokens_per_s"), 0), fmt(r.get("step_ms"), 0),
                   fmt(r["flops_per_token"] / 1e6 if r.get("flops_per_token") else None,
                       1),
                   fmt(r["achieved_flops"] / 1e9 if r.get("achieved_flops") else None,
                       1),
                   fmt(r["peak_flops"] / 1e9 if r.get("peak_flops") else None, 1),
                   f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-",
                   fmt(r.get("peak_mem_mb"), 0)] for r in results["runs"]]), ""]
    if results["ratios"]:
        parts += ["## GAM vs Transformer (SDPA)", "",
                  markdown_table(
                      ["dtype", "T", "tokens/s ratio (gam/transformer)",
                       "inverse FLOPs ratio (transformer/gam FLOPs per token)",
                       "same, attention causal-halved", "MFU gam", "MFU transformer"],
                      [[r["dtype"], r["seq_len"], fmt(r["tokens_per_s_ratio"], 2),
                        fmt(r["inverse_flops_ratio"], 2),
                        fmt(r.get("inverse_flops_ratio_causal"), 2),
                        f"{100 * r['mfu_gam']:.1f}%", f"{100 * r['mfu_transformer']:.1f}%"]
                       for r in results["ratios"]]), ""]
    parts.append("FLOPs per token: 3 x forward (Linear layers incl. the tied head, conv taps, "
                 "GAM memory bank 2 x 2SC, attention 2 x 2TC per layer not causal-halved, "
                 "Mamba scan 9 x d_inner x d_state); MFU = achieved / matmul peak measured in "
                 "the same process for that dtype. A causal attention kernel (SDPA) skips the "
                 "masked half of the scores, so at long T the Transformer's MFU under this "
                 "convention overstates its work (it can exceed 100%); the causal-halved "
                 "ratio is the one to compare with the measured tokens/s ratio.")
    failures = [r for r in results["runs"] if r.get("error")]
    parts += [f"- {r['model']} {r['dtype']} T {r['seq_len']}: {r['status']}: {r['error']}"
              for r in failures]
    return "\n".join(parts)


def _plot(results: dict[str, Any], path: Path) -> Path:
    fig, (ax_t, ax_m) = new_figure(2)
    ok = [r for r in results["runs"] if r["status"] == "ok"]
    labels = [f"{r['model']}\n{r['dtype']} T{r['seq_len']}" for r in ok]
    xs = range(len(ok))
    ax_t.bar(xs, [r["tokens_per_s"] for r in ok], color="tab:blue")
    ax_m.bar(xs, [100 * r["mfu"] for r in ok], color="tab:orange")
    for ax, title, unit in ((ax_t, "training throughput", "tokens/s"),
                            (ax_m, "MFU vs measured matmul peak", "%")):
        ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    return path


def _measure(args: argparse.Namespace, model: str, dtype: str, seq_len: int,
             reason: str | None, base: dict[str, Any], overrides: dict[str, Any]
             ) -> dict[str, Any]:
    """The row of one (model, dtype, seq_len): measured in a worker process."""
    row: dict[str, Any] = {"model": model, "dtype": dtype, "seq_len": seq_len,
                           "batch_size": args.batch_size, "compile": args.compile,
                           "preset": args.model_preset}
    if reason is not None:
        row.update(status="unavailable", error=reason)
    else:
        payload = {"model": model, **base, "seq_len": seq_len, "dtype": dtype}
        merge_worker_result(row, *run_worker(
            "gam.bench.throughput", payload, timeout=args.max_seconds))
        if "flops_per_token" not in row:
            row["flops_per_token"] = flops_per_token(
                model, seq_len, preset=args.model_preset, **overrides,
                max_seq_len=max(seq_len, 1))
        # what a causal kernel computes: attention's masked half skipped
        row["flops_per_token_causal"] = flops_per_token(
            model, seq_len, preset=args.model_preset, causal_halved=True, **overrides,
            max_seq_len=max(seq_len, 1))
    for key in ("tokens_per_s", "peak_flops", "mfu", "flops_per_token"):
        row.setdefault(key, None)
    return row


def run(args: argparse.Namespace) -> int:
    device, threads, command, env = common.setup(args)
    steps = args.steps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    overrides = common.model_overrides(args)
    configs = common.model_configs("throughput", args.models, args.model_preset, overrides)
    if configs is None:
        return 2
    max_mem = default_memory_cap(device, args.max_memory_gb)
    print(f"gam bench throughput: models {args.models}, dtypes {args.dtype}, seq_len "
          f"{args.seq_len}, batch {args.batch_size}, {steps} steps (+{warmup} warm-up), "
          f"device {device}, {threads} threads", flush=True)

    # what every configuration's worker gets besides model, dtype and seq_len
    base = {"preset": args.model_preset, "overrides": overrides, "batch_size": args.batch_size,
            "compile": args.compile, "steps": steps, "warmup": warmup, "lr": args.lr,
            "device": str(device), "threads": args.threads, "seed": args.seed,
            "matmul_size": args.matmul_size, "time_budget_s": 0.6 * args.max_seconds,
            "max_memory_bytes": max_mem}
    runs: list[dict[str, Any]] = []
    for model in args.models:
        reason = common.model_available(model)
        for dtype in args.dtype:
            for seq_len in args.seq_len:
                row = _measure(args, model, dtype, seq_len, reason, base, overrides)
                runs.append(row)
                print(f"  {model:<12} {dtype} T={seq_len:<5} {row['status']:<8} "
                      f"{fmt(row['tokens_per_s'], 0)} tok/s, "
                      f"{fmt((row['flops_per_token'] or 0) / 1e6, 1)} MFLOP/token, "
                      f"peak {fmt((row['peak_flops'] or 0) / 1e9, 1)} GFLOP/s, "
                      f"MFU {fmt(100 * row['mfu'] if row['mfu'] else None, 1)}%"
                      + (f"  [{row['error'][:120]}]" if row.get("error") else ""), flush=True)
    ratios = ratio_rows(runs)
    for r in ratios:
        print(f"  gam/transformer {r['dtype']} T={r['seq_len']}: tokens/s ratio "
              f"{r['tokens_per_s_ratio']:.2f}, inverse FLOPs ratio "
              f"{r['inverse_flops_ratio']:.2f} (causal-halved "
              f"{r['inverse_flops_ratio_causal']:.2f})", flush=True)
    common.write_measurements(
        args, command, env,
        {"overrides": overrides, "batch_size": args.batch_size,
         "seq_lens": list(args.seq_len), "dtypes": list(args.dtype), "compile": args.compile,
         "steps": steps, "warmup": warmup, "lr": args.lr, "matmul_size": args.matmul_size,
         "max_memory_bytes": max_mem,
         "step": "gam train's step (gam.training.step.train_step): autocast forward with "
                 "targets (return_logits=False: chunked linear cross-entropy), backward, "
                 "gradient clipping at 1.0, AdamW.step (gam train's optimizer: fused, betas "
                 "(0.9, 0.95), wd 0.1), zero_grad(set_to_none=True); CPU: "
                 "gam.runtime.tune_cpu_allocator() applied",
         "flops_convention": "3 x forward; Linear (incl. tied head) 2*in*out, conv taps, GAM "
                             "memory 2 x 2*S*C, attention 2 x 2*T*C per layer (not "
                             "causal-halved), Mamba scan 9*d_inner*d_state",
         "model_configs": configs},
        runs, _markdown, _plot, "throughput.png", ratios=ratios)
    return 0

if __name__ == "__main__":
    sys.exit(worker_main(_worker))
