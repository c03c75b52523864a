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

``--strategy fsdp`` shards the model before the optimizer is built and saves sharded
checkpoints (see ``gam.training.fsdp``); the loop is otherwise the same.

A NaN/inf loss or gradient norm stops training before the optimizer step: nothing is saved
over the last good checkpoint, a ``diverged`` record is logged and ``TrainingDivergedError``
is raised (the CLI exits with status 3).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gam
from gam.data import TokenBlocks
from gam.models.io import (
    CheckpointError,
    save_pretrained,
)
from gam.models.registry import model_from_config
from gam.runtime import autocast_context, set_tf32, set_threads, tune_cpu_allocator
from gam.training.checkpoint import (
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
from gam.training.data import epoch_loader
from gam.training.diagnostics import gate_statistics, has_gates
from gam.training.distributed import DistContext, init_distributed, is_sharded
from gam.training.evaluate import evaluate, first_batches
from gam.training.fsdp import full_model, load_sharded_into, save_sharded_checkpoint, shard_model
from gam.training.metrics import (
    MetricsWriter,
    check_metrics,
    check_optional_loggers,
    read_metrics,
)
from gam.training.optim import build_optimizer, build_scheduler, retarget_schedule
from gam.training.plan import RunPlan, check_model_fits, plan_run
from gam.training.progress import Progress
from gam.training.recovery import (
    check_resumable,
    kept_checkpoint,
    refuse_changed_settings,
    refuse_lost_checkpoint,
    write_run_files,
)
from gam.training.rundir import (
    METRICS_FILE,
    discard_unstarted_run,
    read_run_config,
    refuse_a_started_run,
    remove_interrupted_run_writes,
    run_settings,
    training_lock,
)
from gam.training.step import NonFiniteError, train_step

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


def train(run: RunConfig, out_dir: str | Path, options: RuntimeOptions | None = None
          ) -> TrainResult:
    """Train a new run into ``out_dir`` (which must not hold a run already)."""
    return Trainer(run, Path(out_dir), options or RuntimeOptions(), resume=False).run()


def resume(run_dir: str | Path, options: RuntimeOptions | None = None,
           max_steps: int | None = None, epochs: int | None = None,
           data_dir: str | os.PathLike[str] | None = None) -> TrainResult:
    """Continue the run in ``run_dir`` from its latest checkpoint, exactly as if it had never
    stopped (from step 0 if it died before its first checkpoint).

    ``max_steps`` / ``epochs`` change the run's length (e.g. to extend a finished run): they
    replace the recorded values (``epochs`` without ``max_steps`` also drops a recorded
    ``max_steps``, which would still cap the run), the total is recomputed
    (``min(epochs * batches_per_epoch, max_steps)``) and the cosine of the LR schedule is
    recomputed to end at the new total from the step the run is at (the warm-up is not
    redone). Without them the run continues bit for bit. ``data_dir``: where the corpus lives
    now (default: as recorded; its content is checked against the recorded fingerprints).
    Raises CheckpointError, changing nothing, if the run saved a checkpoint that is gone, or if
    ``config.json``'s settings differ from those the checkpoint was trained with (a run's
    settings are fixed at its creation).
    """
    run_dir = Path(run_dir)
    run = run_settings(read_run_config(run_dir), run_dir).with_data_dir(data_dir)
    if epochs is not None:
        run.train.epochs = epochs
        # "train it for N epochs": a recorded --max-steps would otherwise still cap it
        run.train.max_steps = max_steps
    elif max_steps is not None:
        run.train.max_steps = max_steps
    run.train.validate()
    return Trainer(run, run_dir, options or RuntimeOptions(), resume=True).run()


class Trainer:
    def __init__(self, run: RunConfig, run_dir: Path, options: RuntimeOptions,
                 resume: bool) -> None:
        self.run_config = run
        self.run_dir = run_dir
        self.options = options
        self.resuming = resume

    # ---------------------------------------------------------------------------- entry
    def run(self) -> TrainResult:
        # Rank 0 writes the run folder, so it alone holds its lock. A resumed run's folder is
        # locked before anything else starts; a new run's as it is created (in _run), so that
        # a run refused for bad input leaves no folder behind.
        main = int(os.environ.get("RANK", "0")) == 0
        new_folder = main and not self.resuming and not self.run_dir.exists()
        self.state: TrainingState | None = None
        self.written: list[str] = []  # the run files this run created (none it found there)
        try:
            return self._run_locked(main)
        except Exception:
            if main and not self.resuming and (self.state is None or self.state.step == 0):
                discard_unstarted_run(self.run_dir, self.written, new_folder)
            raise

    def _run_locked(self, main: bool) -> TrainResult:
        with contextlib.ExitStack() as locks:
            if main and self.resuming:
                locks.enter_context(training_lock(self.run_dir))
            self._new_run_lock = locks if main and not self.resuming else None
            ctx = init_distributed(self.options.device)
            clean = False
            try:
                result = self._run(ctx)
                clean = True
                return result
            finally:
                # drop the DDP wrapper (its reducer holds the process group) before tearing
                # the group down
                self.train_model = None
                gc.collect()
                ctx.shutdown(clean)

    def _run(self, ctx: DistContext) -> TrainResult:
        self.ctx = ctx
        checkpoint_dir, threads = self._prepare_process()
        plan = plan_run(self.run_config, self.run_dir, ctx, self.options, self.resuming,
                        checkpoint_dir)
        resumed_from, retargeted_from = self._build(plan, checkpoint_dir, threads)
        if self._new_run_lock is not None:
            self._new_run_lock.enter_context(training_lock(self.run_dir))
            refuse_a_started_run(self.run_dir)  # another process may have begun it meanwhile
        self._write_run_dir(plan, checkpoint_dir)
        opts = self.options
        self.writer = MetricsWriter(self.run_dir, active=ctx.is_main, wandb=opts.wandb,
                                    tensorboard=opts.tensorboard, run_config=plan.record)
        self.progress = Progress(ctx.is_main, opts.quiet, opts.progress, plan.total_steps,
                                  self.state.step)
        try:
            self._announce(plan, threads, resumed_from, retargeted_from)
            self._loop(plan.train_blocks, plan.batches_per_epoch, plan.total_steps)
        finally:
            self.progress.close()
            self.writer.close()
        evals = read_metrics(self.run_dir / METRICS_FILE, kind="eval") if ctx.is_main else []
        last = evals[-1] if evals else {}
        return TrainResult(self.run_dir, self.state.step, plan.total_steps,
                           last.get("val_loss"), last.get("val_ppl"), resumed_from)

    # ---------------------------------------------------------------------------- setup
    def _prepare_process(self) -> tuple[Path | None, int]:
        """Optional loggers, the run folder (rank 0's), the checkpoint to resume from, threads
        and allocator; refuses a lost checkpoint or a folder that already holds a run."""
        opts, ctx = self.options, self.ctx
        check_optional_loggers(opts.wandb, opts.tensorboard)
        run_dir = Path(ctx.broadcast_object(str(self.run_dir)))
        self.run_dir = run_dir
        checkpoint_dir = find_checkpoint(run_dir) if self.resuming else None
        if self.resuming:
            check_metrics(run_dir / METRICS_FILE)  # before anything is written
            if checkpoint_dir is None:
                refuse_lost_checkpoint(run_dir, read_run_config(run_dir))
            else:
                refuse_changed_settings(run_dir, checkpoint_dir, self.run_config)
        threads = opts.threads
        if threads is None and checkpoint_dir is not None:
            # the thread count changes the order of float reductions: a resumed run keeps it
            threads = read_state(checkpoint_dir).threads or None
        threads = set_threads(threads)
        tune_cpu_allocator()
        set_tf32(ctx.device, opts.tf32)
        if not self.resuming:
            refuse_a_started_run(run_dir)
        return checkpoint_dir, threads

    def _build(self, plan: RunPlan, checkpoint_dir: Path | None, threads: int
               ) -> tuple[int | None, int | None]:
        """Model, optimizer, scheduler, scaler and state, restored from the checkpoint when
        resuming; returns ``(resumed_from, retargeted_from)`` (the old total steps when the
        run's length changed)."""
        run, cfg, ctx = self.run_config, self.run_config.train, self.ctx
        torch.manual_seed(cfg.seed)
        self.device = ctx.device
        check_model_fits(run.model, plan.model_config, self.device)
        self.model = model_from_config(run.model, plan.model_config).to(self.device)
        if cfg.strategy == "fsdp":
            shard_model(self.model, ctx)  # before the optimizer: it holds the shards
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, plan.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.dtype == "fp16" else None
        self.state = TrainingState(total_steps=plan.total_steps,
                                   batches_per_epoch=plan.batches_per_epoch,
                                   world_size=ctx.world_size, threads=threads,
                                   settings=self._settings(plan))
        self.seq_len = plan.seq_len
        self.val_ids = plan.val_ids
        self.eval_batch_size = cfg.eval_batch_size or plan.per_rank
        if checkpoint_dir is None:
            if ctx.rank:
                torch.manual_seed(cfg.seed + ctx.rank)  # a different dropout stream per rank
            return None, None
        return self._restore(plan, checkpoint_dir, threads)

    @staticmethod
    def _settings(plan: RunPlan) -> dict[str, Any]:
        """The settings as ``config.json`` records them (seq_len resolved...), kept in every
        checkpoint: ``--resume`` compares them with ``config.json``."""
        return RunConfig.from_dict(plan.record).to_dict()

    def _restore(self, plan: RunPlan, checkpoint_dir: Path, threads: int
                 ) -> tuple[int | None, int | None]:
        cfg, ctx = self.run_config.train, self.ctx
        total_steps, world = plan.total_steps, ctx.world_size
        ckpt = load_checkpoint(checkpoint_dir)
        check_resumable(self.run_dir, checkpoint_dir, ckpt.state, plan.batches_per_epoch,
                        total_steps, cfg)
        if cfg.strategy == "fsdp":
            load_sharded_into(ckpt, self.model, self.optimizer, self.scheduler)
        else:
            load_into(ckpt, self.model, self.optimizer, self.scheduler, self.scaler)
        retargeted_from = None
        if ckpt.state.total_steps != total_steps:
            # --resume --max-steps/--epochs: a new length; the cosine ends there instead
            retargeted_from = ckpt.state.total_steps
            retarget_schedule(self.scheduler, total_steps)
            ckpt.state.total_steps = total_steps
        state = self.state = ckpt.state
        state.world_size = world
        state.threads = threads
        state.settings = self._settings(plan)
        if len(ckpt.rng_states) == world:
            restore_rng_state(ckpt.rng_states[ctx.rank])
        else:
            logger.warning("checkpoint was made with %d process(es), resuming with %d: the "
                           "data order is the same but dropout draws differ",
                           len(ckpt.rng_states), world)
            restore_rng_state(ckpt.rng_states[0])
            if ctx.rank:
                torch.manual_seed(cfg.seed + ctx.rank + 1000 * state.step)
        return state.step, retargeted_from

    def _write_run_dir(self, plan: RunPlan, checkpoint_dir: Path | None) -> None:
        ctx = self.ctx
        # FSDP: gathered on rank 0 (every rank takes part)
        whole = full_model(self.model, ctx) if checkpoint_dir is not None else None
        if ctx.is_main:
            write_run_files(self.run_dir, plan.record, plan.tokenizer_bytes, self.state.step,
                            whole, created=self.written)
        ctx.barrier()

    def _announce(self, plan: RunPlan, threads: int, resumed_from: int | None,
                  retargeted_from: int | None) -> None:
        """The first log lines (and the resume record) of a run."""
        run, cfg, ctx, opts = self.run_config, self.run_config.train, self.ctx, self.options
        state, total_steps, progress = self.state, plan.total_steps, self.progress
        if resumed_from is not None:
            record: dict[str, Any] = {"kind": "resume", "step": state.step}
            note = ""
            if retargeted_from is not None:
                record.update(total_steps=total_steps, previous_total_steps=retargeted_from)
                note = (f" (length changed from {retargeted_from} steps; the cosine now "
                        f"ends at step {total_steps})")
            self.writer.write(record)
            progress.message(f"resumed {self.run_dir} at step {state.step}/{total_steps}{note}")
        elif ctx.is_main and not opts.quiet:
            n = gam.count_parameters(self.model)
            progress.message(
                f"training {run.model} ({run.model_preset}, {n['total']:,} parameters) on "
                f"{run.data.dataset}: {len(plan.train_blocks):,} blocks of {plan.seq_len}, "
                f"{plan.batches_per_epoch} steps/epoch, {total_steps} steps, "
                f"{ctx.world_size} process(es) x {threads} thread(s) on {self.device} -> "
                f"{self.run_dir}")
        if ctx.is_main and resumed_from is None and cfg.warmup_steps >= total_steps:
            # the README's smoke run did this: 50 steps inside a 100-step warm-up
            logger.warning(
                "warning: all %d steps are inside the %d-step warm-up (--warmup-steps): the "
                "learning rate never reaches --lr %g; for a short run give e.g. "
                "--warmup-steps %d", total_steps, cfg.warmup_steps, cfg.lr,
                max(1, total_steps // 10))

    # ----------------------------------------------------------------------------- loop
    def _loop(self, train_blocks: TokenBlocks, batches_per_epoch: int, total_steps: int) -> None:
        cfg, ctx, state = self.run_config.train, self.ctx, self.state
        model = self.model
        train_model: torch.nn.Module = model
        if cfg.compile:
            train_model = torch.compile(train_model)
        if ctx.enabled and not is_sharded(model):
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
            drawn = 0
            while state.step < total_steps:
                t0 = time.perf_counter()
                try:
                    x, y = next(batches)
                except StopIteration:
                    if not drawn:  # would loop for ever: the epoch has no batch left
                        raise CheckpointError(
                            f"epoch {epoch + 1} has no batch left to train from batch "
                            f"{state.batch_in_epoch} of {batches_per_epoch}") from None
                    break
                drawn += 1
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
        cfg = self.run_config.train
        try:
            return train_step(self.train_model, self.optimizer, x, y, scheduler=self.scheduler,
                              dtype=cfg.dtype, grad_accum=cfg.grad_accum,
                              grad_clip=cfg.grad_clip, scaler=self.scaler, ctx=self.ctx)
        except NonFiniteError as e:
            self._diverged(e.what, e.value)
            raise  # not reached: _diverged raises

    def _diverged(self, what: str, value: float) -> None:
        state = self.state
        step = state.step + 1
        self.writer.write({"kind": "diverged", "step": step, "epoch": state.epoch + 1,
                           "what": what, "value": value})
        raise TrainingDivergedError(
            f"{what} is {value} at step {step} (epoch {state.epoch + 1}); training stopped. "
            f"{kept_checkpoint(self.run_dir)}. Train again with a lower --lr (or --dtype fp32, "
            f"a smaller --grad-clip)")

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
        # a sharded model's forward is collective: then every rank computes them
        if (ctx.is_main or is_sharded(self.model)) and cfg.gate_stat_batches \
                and has_gates(self.model):
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
        if self.run_config.train.strategy == "fsdp":
            save_sharded_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler,
                                    self.state, rng_states, ctx)
            return
        if ctx.is_main:
            remove_interrupted_run_writes(self.run_dir)
            save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state,
                            rng_states, self.scaler)
            save_pretrained(self.model, self.run_dir)
        ctx.barrier()
