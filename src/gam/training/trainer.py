"""The training loop: ``train(run_config, out_dir)`` and ``resume(run_dir)``.

One optimizer step = one global batch of ``batch_size`` blocks, split over processes (DDP) and
gradient-accumulation micro-batches. After every step, in this order: log the step; evaluate if
the epoch ended, ``eval_every`` divides the step, or it is the last step; save a checkpoint if
``save_every`` divides the step, the epoch ended, or it is the last step. A checkpoint at step s
therefore contains everything logged up to and including step s.

Exact resume: a checkpoint stores the weights, the optimizer / scheduler (/ grad scaler) states,
every RNG state of every rank (dropout draws from the global torch RNG), and the data position
(epoch, batch within epoch). The data order is a function of (seed, epoch) (see
``gam.training.data``), so the resumed run rebuilds it, skips the consumed batches and continues
with bit-identical losses on CPU. The torch thread count is recorded too and reused by the
resumed run unless ``--threads`` says otherwise (a different count reorders float reductions).
``metrics.jsonl`` is cut back to the checkpoint's step first, so the records of steps redone
after the kill are not duplicated.

A NaN/inf loss or gradient norm stops training before the optimizer step: nothing is saved
over the last good checkpoint, a ``diverged`` record is logged and ``TrainingDivergedError``
is raised (the CLI exits with status 3).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import gam
from gam.data import TokenBlocks, eot_token_id
from gam.models.io import (
    MODEL_JSON,
    MODEL_WEIGHTS,
    CheckpointError,
    atomic_write_json,
    load_model_config,
    save_pretrained,
    state_dict_for_saving,
)
from gam.models.registry import model_config, model_from_config
from gam.runtime import tune_cpu_allocator
from gam.training.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    TrainingState,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    load_into,
    read_state,
    restore_rng_state,
    save_checkpoint,
)
from gam.training.config import RunConfig, RuntimeOptions
from gam.training.data import epoch_loader, load_data, load_tokenizer_file
from gam.training.diagnostics import gate_statistics, has_gates
from gam.training.distributed import DistContext, init_distributed, set_threads
from gam.training.evaluate import autocast_context, evaluate, first_batches
from gam.training.metrics import (
    METRICS_FILE,
    MetricsWriter,
    check_optional_loggers,
    read_metrics,
    truncate_metrics,
)
from gam.training.optim import build_optimizer, build_scheduler, retarget_schedule
from gam.training.run import CONFIG_FILE, TOKENIZER_FILE, check_vocab, read_run_config

logger = logging.getLogger("gam.training")


class TrainingDivergedError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training was stopped."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    val_loss: float | None = None
    val_ppl: float | None = None
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "step": self.step, "total_steps": self.total_steps,
                "val_loss": self.val_loss, "val_ppl": self.val_ppl,
                "resumed_from": self.resumed_from}


def default_run_dir(model: str, dataset: str, root: str | Path = "runs") -> Path:
    """``runs/<model>-<dataset>-<timestamp>`` (``text:PATH`` becomes ``text-<file stem>``)."""
    if dataset.startswith("text:"):
        dataset = "text-" + (Path(dataset[5:]).stem or "corpus")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model}-{dataset}")
    return Path(root) / f"{safe}-{stamp}"


def train(run: RunConfig, out_dir: str | Path, options: RuntimeOptions | None = None
          ) -> TrainResult:
    """Train a new run into ``out_dir`` (which must not hold a run already)."""
    return Trainer(run, Path(out_dir), options or RuntimeOptions(), resume=False).run()


def resume(run_dir: str | Path, options: RuntimeOptions | None = None,
           max_steps: int | None = None, epochs: int | None = None) -> TrainResult:
    """Continue the run in ``run_dir`` from its latest checkpoint, exactly as if it had never
    stopped (from step 0 if it died before its first checkpoint).

    ``max_steps`` / ``epochs`` change the run's length (e.g. to extend a finished run): they
    replace the recorded values (``epochs`` without ``max_steps`` also drops a recorded
    ``max_steps``, which would still cap the run), the total is recomputed
    (``min(epochs * batches_per_epoch, max_steps)``) and the cosine of the LR schedule is
    recomputed to end at the new total from the step the run is at (the warm-up is not
    redone). Without them the run continues bit for bit. Raises CheckpointError, changing
    nothing, if the run saved a checkpoint that is gone.
    """
    run_dir = Path(run_dir)
    run = RunConfig.from_dict(read_run_config(run_dir))
    if epochs is not None:
        run.train.epochs = epochs
        # "train it for N epochs": a recorded --max-steps would otherwise still cap it
        run.train.max_steps = max_steps
    elif max_steps is not None:
        run.train.max_steps = max_steps
    run.train.validate()
    return Trainer(run, run_dir, options or RuntimeOptions(), resume=True).run()


class _Progress:
    """tqdm bar on a terminal; plain log lines otherwise; nothing when quiet or not rank 0."""

    def __init__(self, active: bool, quiet: bool, progress: bool | None, total: int,
                 initial: int) -> None:
        self.active = active and not quiet
        use_bar = progress if progress is not None else sys.stderr.isatty()
        self.bar = None
        if self.active and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def step(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    def __init__(self, run: RunConfig, run_dir: Path, options: RuntimeOptions,
                 resume: bool) -> None:
        self.run_config = run
        self.run_dir = run_dir
        self.options = options
        self.resuming = resume

    # ---------------------------------------------------------------------------- entry
    def run(self) -> TrainResult:
        ctx = init_distributed(self.options.device)
        clean = False
        try:
            result = self._run(ctx)
            clean = True
            return result
        finally:
            # drop the DDP wrapper (its reducer holds the process group) before tearing the
            # group down
            self.train_model = None
            gc.collect()
            ctx.shutdown(clean)

    def _run(self, ctx: DistContext) -> TrainResult:
        opts, run = self.options, self.run_config
        cfg = run.train
        self.ctx = ctx
        check_optional_loggers(opts.wandb, opts.tensorboard)
        run_dir = Path(ctx.broadcast_object(str(self.run_dir)))
        self.run_dir = run_dir
        checkpoint_dir = find_checkpoint(run_dir) if self.resuming else None
        if self.resuming and checkpoint_dir is None:
            _refuse_lost_checkpoint(run_dir)
        threads = opts.threads
        if threads is None and checkpoint_dir is not None:
            # the thread count changes the order of float reductions: a resumed run keeps it
            threads = read_state(checkpoint_dir).threads or None
        threads = set_threads(threads)
        tune_cpu_allocator()
        if not self.resuming:
            if (run_dir / CONFIG_FILE).exists() or (run_dir / CHECKPOINT_DIR).exists():
                raise ValueError(f"{run_dir} already holds a run; continue it with --resume "
                                 f"{run_dir} or choose another --out")

        # -------------------------------------------------------------- model config
        mcfg = model_config(run.model, run.preset, **run.model_kwargs())
        seq_len = run.data.seq_len or mcfg.max_seq_len
        if seq_len > mcfg.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len "
                             f"{mcfg.max_seq_len} (raise it with --model-arg "
                             f"max_seq_len={seq_len})")
        world = ctx.world_size
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) is not "
                             f"divisible by the number of processes {world}")
        per_rank = cfg.batch_size // world
        if per_rank % cfg.grad_accum:
            raise ValueError(f"the per-process batch {per_rank} (--batch-size {cfg.batch_size} "
                             f"/ {world} processes) is not divisible by --grad-accum "
                             f"{cfg.grad_accum}")
        device = ctx.device
        if cfg.dtype == "fp16" and device.type != "cuda":
            raise ValueError("--dtype fp16 needs a CUDA device (use bf16 on CPU)")

        # ---------------------------------------------------------------------- data
        tokenizer = None
        if self.resuming and (checkpoint_dir is not None
                              or (run_dir / TOKENIZER_FILE).exists()):
            tokenizer = load_tokenizer_file(run_dir / TOKENIZER_FILE)
        if self.resuming and opts.data_dir is not None:
            run.data.data_dir = str(Path(opts.data_dir).expanduser().resolve())
        data = load_data(run.data, run.tokenizer, ctx, cache_dir=opts.cache_dir,
                         tokenizer=tokenizer)
        tokenizer = data.tokenizer
        check_vocab(tokenizer, mcfg.vocab_size, run_dir / TOKENIZER_FILE, run_dir / CONFIG_FILE)
        train_ids, val_ids = data.ids["train"], data.ids["valid"]
        try:
            train_blocks = TokenBlocks(train_ids, seq_len, drop_last=True)
        except ValueError:
            raise ValueError(
                f"the train split of {run.data.dataset!r} has {len(train_ids)} tokens, fewer "
                f"than one block of --seq-len {seq_len} (+1); use more text (--max-train-rows) "
                f"or a shorter --seq-len") from None
        if len(val_ids) < 2:
            raise ValueError(f"the valid split of {run.data.dataset!r} has {len(val_ids)} "
                             f"token(s); at least 2 are needed to evaluate")
        batches_per_epoch = len(train_blocks) // cfg.batch_size
        if batches_per_epoch == 0:
            raise ValueError(
                f"the train split of {run.data.dataset!r} gives {len(train_blocks)} blocks of "
                f"{seq_len} tokens, fewer than one batch of --batch-size {cfg.batch_size}; use "
                f"more text, a smaller --batch-size or a shorter --seq-len")
        total_steps = cfg.epochs * batches_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)
        fingerprints = {s: data.corpus.fingerprint(s) for s in ("train", "valid")}

        schedule = {"total_steps": total_steps, "batches_per_epoch": batches_per_epoch,
                    "train_blocks": len(train_blocks), "seq_len": seq_len,
                    "tokens_per_step": cfg.batch_size * seq_len, "world_size": world,
                    "per_process_batch_size": per_rank,
                    "micro_batch_size": per_rank // cfg.grad_accum}
        run_json = {
            **run.to_dict(),
            "model_config": mcfg.to_dict(),
            "tokenizer": {**run.tokenizer.to_dict(),
                          "actual_vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                          "eot_token_id": eot_token_id(tokenizer), "file": TOKENIZER_FILE},
            "data": {**run.data.to_dict(), "seq_len": seq_len, "corpus_source": data.corpus.source,
                     "fingerprints": fingerprints,
                     "tokens": {s: int(len(v)) for s, v in data.ids.items()}},
            "schedule": schedule,
            "gam_version": gam.__version__,
            "torch_version": torch.__version__,
        }
        if self.resuming:
            recorded = read_run_config(run_dir)
            old_fp = recorded.get("data", {}).get("fingerprints", {}).get("train")
            if old_fp is not None and old_fp != fingerprints["train"]:
                raise ValueError(f"the train split of {run.data.dataset!r} differs from the one "
                                 f"this run was trained on (fingerprint changed); it cannot be "
                                 f"resumed exactly")
            run_json["created"] = recorded.get("created")

        # --------------------------------------------------------------------- model
        torch.manual_seed(cfg.seed)
        model = model_from_config(run.model, mcfg).to(device)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        scaler = torch.amp.GradScaler("cuda") if cfg.dtype == "fp16" else None
        state = TrainingState(total_steps=total_steps, batches_per_epoch=batches_per_epoch,
                              world_size=world, threads=threads)
        resumed_from = None
        retargeted_from = None
        if checkpoint_dir is not None:
            ckpt = load_checkpoint(checkpoint_dir)
            if ckpt.state.batches_per_epoch != batches_per_epoch:
                raise CheckpointError(
                    f"checkpoint {checkpoint_dir} was made with {ckpt.state.batches_per_epoch} "
                    f"batches per epoch, the data now gives {batches_per_epoch}")
            if total_steps < ckpt.state.step:
                raise ValueError(
                    f"{run_dir} is already at step {ckpt.state.step}, beyond the {total_steps} "
                    f"steps of --epochs {cfg.epochs} / --max-steps {cfg.max_steps}; give a "
                    f"larger --max-steps or --epochs with --resume")
            load_into(ckpt, model, optimizer, scheduler, scaler)
            if ckpt.state.total_steps != total_steps:
                # --resume --max-steps/--epochs: a new length; the cosine ends there instead
                retargeted_from = ckpt.state.total_steps
                retarget_schedule(scheduler, total_steps)
                ckpt.state.total_steps = total_steps
            state = ckpt.state
            state.world_size = world
            state.threads = threads
            resumed_from = state.step
            if len(ckpt.rng_states) == world:
                restore_rng_state(ckpt.rng_states[ctx.rank])
            else:
                logger.warning("checkpoint was made with %d process(es), resuming with %d: the "
                               "data order is the same but dropout draws differ",
                               len(ckpt.rng_states), world)
                restore_rng_state(ckpt.rng_states[0])
                if ctx.rank:
                    torch.manual_seed(cfg.seed + ctx.rank + 1000 * state.step)
        elif ctx.rank:
            torch.manual_seed(cfg.seed + ctx.rank)  # a different dropout stream per rank

        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not self.resuming:
                run_json["created"] = _dt.datetime.now().isoformat(timespec="seconds")
            atomic_write_json(run_dir / CONFIG_FILE, run_json)
            if not (run_dir / TOKENIZER_FILE).is_file():
                tokenizer.save(str(run_dir / TOKENIZER_FILE))
            truncate_metrics(run_dir / METRICS_FILE, state.step)
            if checkpoint_dir is not None:
                _repair_saved_model(run_dir, model, state.step)
        ctx.barrier()

        self.model = model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.state = state
        self.seq_len = seq_len
        self.val_ids = val_ids
        self.device = device
        self.eval_batch_size = cfg.eval_batch_size or per_rank
        writer = MetricsWriter(run_dir, active=ctx.is_main, wandb=opts.wandb,
                               tensorboard=opts.tensorboard, run_config=run_json)
        self.writer = writer
        progress = _Progress(ctx.is_main, opts.quiet, opts.progress, total_steps, state.step)
        self.progress = progress
        try:
            if resumed_from is not None:
                record: dict[str, Any] = {"kind": "resume", "step": state.step}
                note = ""
                if retargeted_from is not None:
                    record.update(total_steps=total_steps, previous_total_steps=retargeted_from)
                    note = (f" (length changed from {retargeted_from} steps; the cosine now "
                            f"ends at step {total_steps})")
                writer.write(record)
                progress.message(f"resumed {run_dir} at step {state.step}/{total_steps}{note}")
            elif ctx.is_main and not opts.quiet:
                n = gam.count_parameters(model)
                progress.message(
                    f"training {run.model} ({run.preset}, {n['total']:,} parameters) on "
                    f"{run.data.dataset}: {len(train_blocks):,} blocks of {seq_len}, "
                    f"{batches_per_epoch} steps/epoch, {total_steps} steps, {world} process(es) "
                    f"x {threads} thread(s) on {device} -> {run_dir}")
            if ctx.is_main and resumed_from is None and cfg.warmup_steps >= total_steps:
                # the README's smoke run did this: 50 steps inside a 100-step warm-up
                logger.warning(
                    "warning: all %d steps are inside the %d-step warm-up (--warmup-steps): the "
                    "learning rate never reaches --lr %g; for a short run give e.g. "
                    "--warmup-steps %d", total_steps, cfg.warmup_steps, cfg.lr,
                    max(1, total_steps // 10))
            self._loop(train_blocks, batches_per_epoch, total_steps)
        finally:
            progress.close()
            writer.close()
        evals = read_metrics(run_dir / METRICS_FILE, kind="eval") if ctx.is_main else []
        last = evals[-1] if evals else {}
        return TrainResult(run_dir, state.step, total_steps, last.get("val_loss"),
                           last.get("val_ppl"), resumed_from)

    # ----------------------------------------------------------------------------- loop
    def _loop(self, train_blocks: TokenBlocks, batches_per_epoch: int, total_steps: int) -> None:
        cfg, ctx, state = self.run_config.train, self.ctx, self.state
        model = self.model
        train_model: torch.nn.Module = model
        if cfg.compile:
            train_model = torch.compile(train_model)
        if ctx.enabled:
            train_model = torch.nn.parallel.DistributedDataParallel(
                train_model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        self.train_model = train_model
        model.train()
        if state.step >= total_steps:
            self.progress.message(
                f"run already finished ({state.step}/{total_steps} steps); to train it longer "
                f"give --max-steps N (or --epochs N) with --resume")
            return
        tokens_per_step = cfg.batch_size * self.seq_len
        resumed_at = state.step
        window_time, window_tokens = 0.0, 0
        run_started = time.perf_counter()
        while state.step < total_steps:
            epoch = state.epoch
            loader = epoch_loader(train_blocks, cfg.batch_size, cfg.seed, epoch, ctx,
                                  start_batch=state.batch_in_epoch)
            batches = iter(loader)
            while state.step < total_steps:
                t0 = time.perf_counter()
                try:
                    x, y = next(batches)
                except StopIteration:
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                first_compiled = cfg.compile and state.step == resumed_at
                if first_compiled:
                    self.progress.message("compiling the model (torch.compile): the first step "
                                          "takes a while (~20 s on a CPU)...")
                loss, grad_norm = self._train_step(x, y)
                dt = time.perf_counter() - t0
                if first_compiled:
                    self.progress.message(f"compiled; first step took {dt:.1f} s")
                state.step += 1
                state.batch_in_epoch += 1
                state.epoch_train_time += dt
                state.epoch_tokens += tokens_per_step
                state.total_train_time += dt
                window_time += dt
                window_tokens += tokens_per_step
                self.progress.step(loss, lr)
                if state.step % cfg.log_every == 0 or state.step == total_steps:
                    record = {"kind": "train", "step": state.step, "epoch": epoch + 1,
                              "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": window_tokens / max(window_time, 1e-9),
                              "elapsed_s": time.perf_counter() - run_started}
                    self.writer.write(record)
                    if self.progress.bar is None:
                        self.progress.message(
                            f"step {state.step}/{total_steps} | epoch {epoch + 1} | loss "
                            f"{loss:.4f} | lr {lr:.2e} | {record['tokens_per_s']:,.0f} tok/s")
                    window_time, window_tokens = 0.0, 0
                epoch_end = state.batch_in_epoch >= batches_per_epoch
                final = state.step >= total_steps
                if epoch_end or final or (cfg.eval_every and state.step % cfg.eval_every == 0):
                    self._evaluate(epoch_end)
                if epoch_end:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    state.epoch_train_time = 0.0
                    state.epoch_tokens = 0
                if epoch_end or final or (cfg.save_every and state.step % cfg.save_every == 0):
                    self._save()
                if epoch_end:
                    break

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        cfg, ctx = self.run_config.train, self.ctx
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        xs, ys = x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (xm, ym) in enumerate(zip(xs, ys, strict=True)):
            sync = i == len(xs) - 1
            no_sync = self.train_model.no_sync() if (ctx.enabled and not sync) \
                else contextlib.nullcontext()
            with no_sync:
                with autocast_context(self.device, cfg.dtype):
                    # return_logits=False: the loss goes through the head chunk by chunk,
                    # without holding all B*T x vocab logits
                    _, loss = self.train_model(xm, ym, return_logits=False)
                loss_sum += loss.detach().double()
                scaled = loss / cfg.grad_accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
        loss_sum /= cfg.grad_accum
        if ctx.enabled:
            ctx.all_reduce_sum(loss_sum)
            loss_sum /= ctx.world_size
        loss_value = float(loss_sum)
        if not math.isfinite(loss_value):
            self._diverged("loss", loss_value)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # norm only
        grad_norm_value = float(grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on inf/nan gradients
            self.scaler.update()
        else:
            if not math.isfinite(grad_norm_value):
                self._diverged("gradient norm", grad_norm_value)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm_value

    def _diverged(self, what: str, value: float) -> None:
        state = self.state
        step = state.step + 1
        self.writer.write({"kind": "diverged", "step": step, "epoch": state.epoch + 1,
                           "what": what, "value": value})
        ckpt = find_checkpoint(self.run_dir)
        if ckpt is not None:
            kept = (f"The last good checkpoint (step {load_checkpoint_step(ckpt)}) is kept in "
                    f"{ckpt.parent}")
        else:
            kept = "No checkpoint had been saved yet (see --save-every)"
        raise TrainingDivergedError(
            f"{what} is {value} at step {step} (epoch {state.epoch + 1}); training stopped. "
            f"{kept}. Train again with a lower --lr (or --dtype fp32, a smaller --grad-clip)")

    # ------------------------------------------------------------------- eval and save
    def _evaluate(self, epoch_end: bool) -> None:
        cfg, ctx, state = self.run_config.train, self.ctx, self.state
        # the bar stays frozen while the whole split is evaluated: say what is going on
        self.progress.message(f"evaluating step {state.step} on {len(self.val_ids):,} "
                              f"validation tokens...")
        t0 = time.perf_counter()
        result = evaluate(self.model, self.val_ids, self.seq_len, self.eval_batch_size,
                          cfg.dtype, ctx, self.device)
        record: dict[str, Any] = {
            "kind": "eval", "step": state.step, "epoch": state.epoch + 1, "epoch_end": epoch_end,
            "val_loss": result["loss"], "val_ppl": result["ppl"], "val_tokens": result["tokens"],
            "epoch_time_s": state.epoch_train_time,
            "tokens_per_s": state.epoch_tokens / max(state.epoch_train_time, 1e-9),
            "train_time_s": state.total_train_time,
        }
        if ctx.is_main and cfg.gate_stat_batches and has_gates(self.model):
            batches = first_batches(self.val_ids, self.seq_len, self.eval_batch_size,
                                    cfg.gate_stat_batches)
            with autocast_context(self.device, cfg.dtype):
                record["gates"] = gate_statistics(self.model, batches)
        record["eval_time_s"] = time.perf_counter() - t0
        self.writer.write(record)
        what = "end of epoch" if epoch_end else "eval"
        self.progress.message(
            f"{what} {state.epoch + 1} | step {state.step} | val loss {result['loss']:.4f} | "
            f"val ppl {result['ppl']:.2f} | epoch time {state.epoch_train_time:.1f}s | "
            f"{record['tokens_per_s']:,.0f} tok/s")
        ctx.barrier()

    def _save(self) -> None:
        ctx = self.ctx
        rng_states = ctx.all_gather_objects(capture_rng_state())
        if ctx.is_main:
            save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state,
                            rng_states, self.scaler)
            save_pretrained(self.model, self.run_dir)
        ctx.barrier()


def load_checkpoint_step(folder: Path) -> int:
    """Step of a checkpoint folder (-1 if its state file is unreadable)."""
    try:
        return read_state(folder).step
    except CheckpointError:
        return -1


def _refuse_lost_checkpoint(run_dir: Path) -> None:
    """CheckpointError if the run saved a checkpoint that is gone.

    Resuming from step 0 is right for a run that died before its first checkpoint, but after
    one it would silently retrain and cut ``metrics.jsonl`` back to nothing. A checkpoint was
    saved if ``checkpoint/latest.json`` or the run's ``model.safetensors`` exist (both are
    written only with a checkpoint).
    """
    latest = run_dir / CHECKPOINT_DIR / LATEST
    weights = run_dir / MODEL_WEIGHTS
    if not latest.exists() and not weights.exists():
        return
    recorded = [int(r.get("step", 0)) for r in read_metrics(run_dir / METRICS_FILE)]
    done = f" (metrics.jsonl records steps up to {max(recorded)})" if recorded else ""
    raise CheckpointError(
        f"cannot resume {run_dir}: it saved a checkpoint{done} but "
        f"{run_dir / CHECKPOINT_DIR} holds no complete step-* folder; nothing was changed. "
        f"Restore the checkpoint folder, or train a new run with another --out")


def _repair_saved_model(run_dir: Path, model: torch.nn.Module, step: int) -> None:
    """Rewrite ``RUN_DIR/model.json`` + ``model.safetensors`` from the checkpoint's weights (in
    ``model``) if they are missing, unreadable or stale, so that eval / generate / export work.
    """
    weights = run_dir / MODEL_WEIGHTS
    expected = state_dict_for_saving(model)
    why = None
    try:
        load_model_config(run_dir)
        saved = load_file(str(weights)) if weights.is_file() else None
    except (CheckpointError, SafetensorError, OSError, ValueError) as e:
        why, saved = f"unreadable: {_one_line(e)}", None
    if why is None:
        if saved is None:
            why = "missing"
        elif saved.keys() != expected.keys() or not all(
                torch.equal(saved[k], v) for k, v in expected.items()):
            why = "not the checkpoint's weights"
    if why is None:
        return
    save_pretrained(model, run_dir)
    logger.warning("repaired %s and %s from the checkpoint of step %d (they were %s)",
                   weights, run_dir / MODEL_JSON, step, why)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
