"""What a run resolves to before it trains: the model config, the data cut into blocks, the
schedule (total steps, batches per epoch...) and the ``config.json`` record (``plan_run``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gam
from gam.data import TokenBlocks, eot_token_id
from gam.data.passkey import PasskeyGenerator, PasskeyMixBlocks
from gam.errors import UsageError, available_memory_bytes
from gam.files import sha256_file
from gam.models.registry import model_config, model_from_config
from gam.runtime import tf32_enabled
from gam.training.config import RunConfig, RuntimeOptions
from gam.training.data import load_data, load_tokenizer_file
from gam.training.distributed import DistContext
from gam.training.run import check_vocab
from gam.training.rundir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    check_recorded_split,
    check_tokenizer_file,
    read_run_config,
    run_record,
)
from gam.training.rundir import now as rundir_now


@dataclass
class RunPlan:
    """What a run's settings and data resolve to before training starts."""

    model_config: Any
    seq_len: int
    per_rank: int
    tokenizer: Any
    train_blocks: TokenBlocks | PasskeyMixBlocks
    val_ids: Any
    batches_per_epoch: int
    total_steps: int
    record: dict[str, Any]
    tokenizer_bytes: bytes | None = None  # tokenizer.json to write (None: the run's is kept)


def _check_batch(run: RunConfig, ctx: DistContext, mcfg: Any) -> tuple[int, int]:
    """``(seq_len, per-process batch)``; ValueError for settings that cannot be run."""
    cfg = run.train
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
    if cfg.dtype == "fp16" and ctx.device.type != "cuda":
        raise ValueError("--dtype fp16 needs a CUDA device (use bf16 on CPU)")
    return seq_len, per_rank

def plan_run(run: RunConfig, run_dir: Path, ctx: DistContext, opts: RuntimeOptions,
             resuming: bool, checkpoint_dir: Path | None) -> RunPlan:
    """Model config, data, blocks and schedule of the run, and its ``config.json`` record."""
    cfg = run.train
    mcfg = model_config(run.model, run.model_preset, **run.model_kwargs())
    seq_len, per_rank = _check_batch(run, ctx, mcfg)
    tokenizer = tokenizer_bytes = None
    recorded = read_run_config(run_dir) if resuming else {}
    if resuming:  # a run recorded before a model setting existed keeps what it trained with
        mcfg = mcfg.as_recorded(recorded.get("model_config"))
    if resuming and (checkpoint_dir is not None
                          or (run_dir / TOKENIZER_FILE).exists()):
        check_tokenizer_file(run_dir, recorded)
        tokenizer = load_tokenizer_file(run_dir / TOKENIZER_FILE)
    data = load_data(run.data, run.tokenizer, ctx, cache_dir=opts.cache_dir,
                     tokenizer=tokenizer)
    if tokenizer is None:
        tokenizer_bytes = data.tokenizer.to_str(pretty=True).encode("utf-8")
        tokenizer_sha256 = hashlib.sha256(tokenizer_bytes).hexdigest()
    else:
        tokenizer_sha256 = sha256_file(run_dir / TOKENIZER_FILE)
    tokenizer = data.tokenizer
    check_vocab(tokenizer, mcfg.vocab_size, run_dir / TOKENIZER_FILE, run_dir / CONFIG_FILE)
    train_blocks, val_ids = _blocks(run.data.dataset, data.ids, seq_len)
    if run.data.passkey_mix:
        train_blocks = PasskeyMixBlocks(train_blocks, seq_len, PasskeyGenerator(data.tokenizer),
                                        run.data.passkey_mix, cfg.seed)
    batches_per_epoch = len(train_blocks) // cfg.batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"the train split of {run.data.dataset!r} gives {len(train_blocks)} blocks of "
            f"{seq_len} tokens, fewer than one batch of --batch-size {cfg.batch_size}; use "
            f"more text, a smaller --batch-size or a shorter --seq-len")
    total_steps = cfg.epochs * batches_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    corpus = data.corpus
    fingerprints = {s: corpus.fingerprint(s) for s in corpus.splits}
    tokens = {s: int(len(v)) for s, v in data.ids.items()}
    if resuming:
        for split in ("train", "valid"):
            check_recorded_split(run_dir, recorded, split, fingerprints[split],
                                 corpus.files.get(split), tokens[split])
        created = recorded.get("created")
    else:
        created = rundir_now()
    schedule = {"total_steps": total_steps, "batches_per_epoch": batches_per_epoch,
                "train_blocks": len(train_blocks), "seq_len": seq_len,
                "tokens_per_step": cfg.batch_size * seq_len, "world_size": ctx.world_size,
                "per_process_batch_size": per_rank,
                "micro_batch_size": per_rank // cfg.grad_accum}
    record = run_record(
        run.to_dict(), mcfg.to_dict(),
        tokenizer={"actual_vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                   "eot_token_id": eot_token_id(tokenizer), "sha256": tokenizer_sha256},
        data={"seq_len": seq_len, "corpus_source": corpus.source,
              "fingerprints": fingerprints, "files": dict(corpus.files), "tokens": tokens},
        schedule=schedule,
        versions={"gam_version": gam.__version__, "torch_version": torch.__version__},
        created=created)
    # how it ran (may change on --resume): TF32 changes float32 results on CUDA
    record["runtime"] = {"device": str(ctx.device),
                         "tf32": tf32_enabled() if ctx.device.type == "cuda" else None}
    return RunPlan(mcfg, seq_len, per_rank, tokenizer, train_blocks, val_ids,
                   batches_per_epoch, total_steps, record, tokenizer_bytes)


def _blocks(dataset: str, ids: dict[str, Any], seq_len: int) -> tuple[TokenBlocks, Any]:
    """Train blocks and validation ids; ValueError when a split is too short."""
    train_ids, val_ids = ids["train"], ids["valid"]
    try:
        train_blocks = TokenBlocks(train_ids, seq_len, drop_last=True)
    except ValueError:
        raise ValueError(
            f"the train split of {dataset!r} has {len(train_ids)} tokens, fewer than one block "
            f"of --seq-len {seq_len} (+1); use more text (--max-train-rows) or a shorter "
            f"--seq-len") from None
    if len(val_ids) < 2:
        raise ValueError(f"the valid split of {dataset!r} has {len(val_ids)} token(s); at "
                         f"least 2 are needed to evaluate")
    return train_blocks, val_ids


# bytes per fp32 parameter while training: the weight, its gradient and AdamW's two moments
TRAINING_BYTES_PER_PARAMETER_BYTE = 4


def check_model_fits(name: str, config: Any, device: torch.device) -> None:
    """Refuse a model whose weights, gradients and optimizer state alone exceed the memory the
    device has free (e.g. a ``max_seq_len`` whose position table cannot be allocated), before
    anything is allocated: a UsageError naming the sizes to lower."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = model_from_config(name, config)
    need = TRAINING_BYTES_PER_PARAMETER_BYTE * sum(
        p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory_bytes()
    if free is not None and need > free:
        sizes = ", ".join(f"{k}={getattr(config, k)}" for k in
                          ("max_seq_len", "d_model", "n_layers", "vocab_size")
                          if hasattr(config, k))
        raise UsageError(f"the {name} model ({sizes}) needs {need / 2**30:.1f} GiB for its "
                         f"weights, gradients and AdamW state, more than the {free / 2**30:.1f} "
                         f"GiB free on {device.type}; lower these sizes (--model-arg KEY=VALUE, "
                         f"--vocab-size)")
