"""``gam bench decode``: speed and memory of cached (incremental) decoding vs context length.

For each model (gam, transformer with its KV cache, mamba; ``--preset`` default ``paper``,
built with ``max_seq_len`` = longest context + new tokens, eval mode, random weights) and each
context length ``ctx`` (128 ... 16384): a random prompt of ``ctx`` tokens is encoded by
``model.prefill`` (timed and reported as ``prefill_ms``, not part of tokens/s) and a few untimed
steps warm the step path; the caches of all contexts are kept. Then ``--new-tokens`` greedy
tokens are generated with ``model.step`` in rounds, one step of every context per round, so
that a slow spell of a shared machine affects all contexts alike (timing each context's
steps in one block showed +-15% between contexts for GAM, whose step does the same work at
every context). ``ms_per_token`` (median) and ``tokens_per_s`` (batch / median step time)
come from those steps alone.

Memory per context: ``state_mb`` is the decode state after the prompt of ``ctx`` tokens (GAM:
k-1 conv inputs per layer; Mamba: conv inputs and the SSM state; Transformer: the keys and values
of the ``ctx`` tokens seen, i.e. the KV cache's used part), ``state_alloc_mb`` what the cache
objects hold (this Transformer preallocates its KV cache to max_seq_len), and ``peak_mem_mb``
the peak memory growth during prefill + warm-up steps (``MemoryMeter``: RSS on a CPU,
``max_memory_allocated`` on a GPU) over what was allocated before (the model and the caches
of the shorter contexts).

Each model runs in its own process (one per model: a fresh allocator and thread pool, a
``--max-seconds`` limit whose contexts that did not finish are recorded as ``timeout``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gam.bench import common, reports
from gam.bench.measure import MemoryMeter, tensor_bytes
from gam.bench.workers import emit, run_worker, worker_main
from gam.errors import is_oom_error
from gam.models.blocks import block_decode_state_bytes
from gam.models.registry import build_model
from gam.runtime import synchronize
from gam.training.argtypes import positive_int, positive_number

DEFAULT_MODELS = ["gam", "transformer", "mamba"]
DEFAULT_CONTEXTS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
QUICK_CONTEXTS = [128, 256, 512, 1024, 2048]
WARMUP_STEPS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser, DEFAULT_MODELS,
                               "build_model names to time (default: %(default)s)")
    parser.add_argument("--contexts", nargs="+", type=positive_int, default=None, metavar="CTX",
                        help="context (prompt) lengths (default 128..16384 doubling; quick: "
                             "128..2048)")
    parser.add_argument("--new-tokens", type=positive_int, default=None,
                        help="timed generated tokens per context (default 64; quick 16)")
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--max-seconds", type=positive_number, default=900.0,
                        help="wall-clock limit per model (its own process)")


# ---------------------------------------------------------------------------------- worker
def _worker(payload: dict[str, Any]) -> None:
    device = torch.device(payload["device"])
    torch.manual_seed(payload.get("seed", 0))
    contexts, n_new, batch = payload["contexts"], payload["new_tokens"], payload["batch_size"]
    max_len = max(contexts) + n_new + WARMUP_STEPS + 1
    model = build_model(payload["model"], payload["preset"], max_seq_len=max_len,
                        **payload.get("overrides", {})).to(device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(payload.get("seed", 0))
    params = sum(p.numel() for p in model.parameters())
    # warm up every code path once on a short prompt
    logits, cache = model.prefill(torch.randint(vocab, (batch, 8), generator=gen).to(device))
    for _ in range(WARMUP_STEPS):
        logits, cache = model.step(logits.argmax(-1), cache)
    del logits, cache
    # Phase 1, one context after another: prefill (timed), warm-up steps, memory. The caches
    # are kept so that phase 2 can time every context in the same rounds.
    live: list[dict[str, Any]] = []
    for ctx in contexts:
        prompt = torch.randint(vocab, (batch, ctx), generator=gen).to(device)
        meter = MemoryMeter(device)
        try:
            meter.start()
            synchronize(device)
            t0 = time.perf_counter()
            logits, cache = model.prefill(prompt)
            token = logits.argmax(-1)  # (B,)
            synchronize(device)
            prefill_s = time.perf_counter() - t0
            state_used = sum(block_decode_state_bytes(b, s)  # what ctx tokens fill
                             for b, s in zip(model.blocks, cache.layers, strict=True))
            state_alloc = tensor_bytes(cache.layers)
            for _ in range(WARMUP_STEPS):
                logits, cache = model.step(token, cache)
                token = logits.argmax(-1)
            peak = meter.growth_bytes()
        except Exception as exc:  # noqa: BLE001 - recorded, larger contexts skipped
            status = "oom" if is_oom_error(exc) else "error"
            emit({"ctx": ctx, "status": status,
                  "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            break
        live.append({"ctx": ctx, "token": token, "cache": cache, "step_s": [],
                     "prefill_s": prefill_s, "state_used": state_used,
                     "state_alloc": state_alloc, "peak": peak, "memory_method": meter.method})
        del logits, prompt
    # Phase 2: n_new rounds, each one step of every context in turn, so that a slow spell of
    # the machine (other tenants, frequency) hits all contexts alike instead of one.
    for _ in range(n_new):
        for run in live:
            synchronize(device)
            t0 = time.perf_counter()
            logits, run["cache"] = model.step(run["token"], run["cache"])
            run["token"] = logits.argmax(-1)
            synchronize(device)
            run["step_s"].append(time.perf_counter() - t0)
    for run in live:
        step_s = run["step_s"]
        emit({
            "ctx": run["ctx"], "status": "ok", "new_tokens": n_new,
            "prefill_ms": run["prefill_s"] * 1e3,
            "prefill_tokens_per_s": batch * run["ctx"] / run["prefill_s"],
            "ms_per_token": statistics.median(step_s) * 1e3,
            "ms_per_token_mean": sum(step_s) / n_new * 1e3,
            "ms_per_token_min": min(step_s) * 1e3,
            "tokens_per_s": batch / statistics.median(step_s),
            "tokens_per_s_mean": batch * n_new / sum(step_s),
            "state_mb": run["state_used"] / 2**20,
            "state_alloc_mb": run["state_alloc"] / 2**20,
            "peak_mem_mb": run["peak"] / 2**20,
            "memory_method": run["memory_method"],
            "parameters": params, "max_seq_len": max_len,
        })


# ------------------------------------------------------------------------------------ run
def _markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    ctxs = sorted({r["ctx"] for r in runs})
    by = {(r["model"], r["ctx"]): r for r in runs}

    def cell(model: str, ctx: int, field: str, digits: int) -> str:
        r = by.get((model, ctx))
        if r is None:
            return ""
        return reports.fmt(r.get(field), digits) if r["status"] == "ok" else r["status"]

    s = results["settings"]
    parts = [f"# gam bench decode: cached greedy decoding (preset {s['preset']}, batch "
             f"{s['batch_size']}, {s['new_tokens']} timed tokens per context"
             f"{common.overrides_text(s['overrides'])})", "",
             reports.environment_markdown(results["environment"], results["command"]), ""]
    for title, field, digits in (("Decode speed (tokens/s = batch / median step time, "
                                  "prefill excluded)", "tokens_per_s", 1),
                                 ("Time per generated token (ms, median)", "ms_per_token", 2),
                                 ("Prefill time (ms)", "prefill_ms", 0),
                                 ("Decode state in use (MB)", "state_mb", 2),
                                 ("Peak memory growth during prefill + decode (MB)",
                                  "peak_mem_mb", 1)):
        parts += [f"## {title}", "",
                  reports.markdown_table(["context", *models],
                                         [[c, *(cell(m, c, field, digits) for m in models)]
                                          for c in ctxs]), ""]
    errors = [r for r in runs if r.get("error")]
    if errors:
        parts += ["## Failures", ""] + [f"- {r['model']} ctx {r['ctx']}: {r['status']}: "
                                        f"{r['error']}" for r in errors]
    return "\n".join(parts)


def _plot(results: dict[str, Any], path: Path) -> Path:
    fig, axes = reports.new_figure(3, width=5.0)
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        ok = [r for r in results["runs"] if r["model"] == model and r["status"] == "ok"]
        if not ok:
            continue
        x = [r["ctx"] for r in ok]
        axes[0].plot(x, [r["tokens_per_s"] for r in ok], "o-", label=model)
        axes[1].plot(x, [r["prefill_ms"] for r in ok], "o-", label=model)
        axes[2].plot(x, [max(r["state_mb"], 1e-3) for r in ok], "o-", label=model)
    titles = (("decode speed (prefill excluded)", "tokens/s", False),
              ("prefill time", "ms", True), ("decode state", "MB", True))
    for ax, (title, unit, logy) in zip(axes, titles, strict=True):
        reports.style_log_axis(ax, title, unit, "context length", logy)
    s = results["settings"]
    return reports.save_measured_figure(
        fig, path, f"cached decoding, preset {s['preset']}, batch {s['batch_size']}", results)


def run(args: argparse.Namespace) -> int:
    device, threads, command, env = common.setup(args)
    contexts = sorted(set(args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS)))
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    overrides = common.model_overrides(args)
    configs = common.model_configs("decode", args.models, args.model_preset, overrides)
    if configs is None:
        return 2
    print(f"gam bench decode: models {args.models}, contexts {contexts}, {new_tokens} new "
          f"tokens, batch {args.batch_size}, device {device}, {threads} threads", flush=True)
    runs: list[dict[str, Any]] = []
    for model in args.models:
        reason = common.model_available(model)
        records: list[dict[str, Any]] = []
        status, error = "unavailable", reason
        if reason is None:
            payload = {"model": model, "preset": args.model_preset, "overrides": overrides,
                       "contexts": contexts, "new_tokens": new_tokens,
                       "batch_size": args.batch_size, "device": str(device),
                       "threads": args.threads, "seed": args.seed}
            t0 = time.perf_counter()
            status, records, error = run_worker("gam.bench.decode", payload,
                                                timeout=args.max_seconds)
            print(f"  {model}: {len(records)} record(s), {status} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        done = {r["ctx"]: r for r in records if "ctx" in r}
        crash = next((r for r in records if "ctx" not in r), None)
        failed = None
        for ctx in contexts:
            row: dict[str, Any] = {"model": model, "ctx": ctx, "batch_size": args.batch_size}
            if ctx in done:
                row.update(done[ctx])
                if row["status"] != "ok":
                    failed = f"{row['status']} at ctx {ctx}"
            elif failed is not None:
                row.update(status="skipped", error=failed)
            elif crash is not None:
                row.update(status=crash["status"], error=crash.get("error"))
                failed = f"{crash['status']} at ctx {ctx}"
            else:
                row.update(status=status if status != "ok" else "error",
                           error=error or "no result from the worker")
                failed = f"{row['status']} at ctx {ctx}"
            for key in ("tokens_per_s", "ms_per_token", "prefill_ms", "state_mb",
                        "peak_mem_mb"):
                row.setdefault(key, None)
            runs.append(row)
            print(f"    ctx {ctx:<6} {row['status']:<8} {reports.fmt(row['tokens_per_s'], 1)} "
                  f"tok/s ({reports.fmt(row['ms_per_token'], 2)} ms/token), prefill "
                  f"{reports.fmt(row['prefill_ms'], 0)} ms, state "
                  f"{reports.fmt(row['state_mb'], 2)} MB, peak {reports.fmt(row['peak_mem_mb'], 1)}"
                  f" MB", flush=True)
    common.write_measurements(
        args, command, env,
        {"overrides": overrides, "contexts": contexts, "new_tokens": new_tokens,
         "warmup_steps": WARMUP_STEPS, "batch_size": args.batch_size,
         "decoding": "greedy; model.prefill(prompt) then model.step per token",
         "model_configs": configs},
        runs, _markdown, _plot, "decode.png")
    return 0

if __name__ == "__main__":
    sys.exit(worker_main(_worker))
