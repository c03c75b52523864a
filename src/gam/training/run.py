"""Loading a training run back: ``load_run`` (model, tokenizer, config) and ``evaluate_run``.

The run directory's layout and ``config.json`` are :mod:`gam.training.rundir`'s.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gam.data import load_corpus
from gam.models.io import MODEL_JSON, CheckpointError, load_pretrained
from gam.models.lm import CausalLM
from gam.runtime import resolve_device
from gam.training.config import DataConfig, TokenizerConfig
from gam.training.data import load_data, load_tokenizer_file
from gam.training.distributed import DistContext
from gam.training.evaluate import evaluate
from gam.training.rundir import (
    TOKENIZER_FILE,
    check_recorded_split,
    check_run_files,
    read_run_config,
    recorded_vocab_size,
    run_settings,
)

logger = logging.getLogger("gam.training")

__all__ = ["evaluate_run", "load_run", "run_split_ids"]


def check_vocab(tokenizer: Tokenizer, model_vocab: int, tokenizer_path: Path,
                model_path: Path, recorded: int | None = None) -> None:
    """CheckpointError if the tokenizer can produce ids the model has no embedding for, or is
    not the tokenizer the run recorded."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > model_vocab:
        raise CheckpointError(
            f"vocab size mismatch: tokenizer {tokenizer_path} has {size} tokens but the model "
            f"in {model_path} has vocab_size {model_vocab}")
    if recorded is not None and size != recorded:
        raise CheckpointError(
            f"vocab size mismatch: tokenizer {tokenizer_path} has {size} tokens but the run "
            f"recorded a tokenizer of {recorded} tokens")


def load_run(run_dir: str | os.PathLike[str], map_location: str | Any = "cpu"
             ) -> tuple[CausalLM, Tokenizer, dict[str, Any]]:
    """``(model, tokenizer, run_config)`` of a training run directory.

    The model holds the latest saved weights (``RUN_DIR/model.safetensors``) in eval mode;
    ``run_config`` is the parsed ``config.json``. Raises ValueError when ``run_dir`` holds no
    run and CheckpointError (naming the file) for missing, truncated or mismatched files,
    including a model or tokenizer that is not the one ``config.json`` records
    (:func:`gam.training.rundir.check_run_files`).
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not (run_dir / MODEL_JSON).is_file():
        raise CheckpointError(f"{run_dir} has no saved model yet ({run_dir / MODEL_JSON} is "
                              f"missing; the run saves it with its first checkpoint)")
    check_run_files(run_dir, config)
    model = load_pretrained(run_dir, map_location=map_location)
    tokenizer = load_tokenizer_file(run_dir / TOKENIZER_FILE)
    recorded = recorded_vocab_size(config)
    check_vocab(tokenizer, model.config.vocab_size, run_dir / TOKENIZER_FILE,
                run_dir / MODEL_JSON, recorded)
    model.eval()
    return model, tokenizer, config


def evaluate_run(run_dir: str | os.PathLike[str], split: str = "valid",
                 data_dir: str | None = None, batch_size: int | None = None,
                 device: str = "auto", dtype: str = "fp32", max_val_rows: int | None = None,
                 all_rows: bool = False, cache_dir: str | None = None) -> dict[str, Any]:
    """Token-weighted loss and perplexity of a run's model on ``split`` of its corpus, cut as
    in training (same ``max_val_rows`` unless overridden, same block length).

    The split's text is checked against the fingerprint the run recorded (ValueError naming
    both files when another file was read, e.g. a plain copy beside the ``.xz`` with other
    text), and, with the run's own row cut, its token count (CheckpointError naming the
    tokenizer)."""
    dev = resolve_device(device)
    model, tokenizer, config = load_run(run_dir, map_location=dev)
    run = run_settings(config, run_dir)
    ids = run_split_ids(run_dir, config, tokenizer, split, data_dir, max_val_rows, all_rows,
                        cache_dir)
    seq_len = run.data.seq_len or model.config.max_seq_len
    if batch_size is None:
        batch_size = run.train.eval_batch_size or run.train.batch_size
    blocks = -(-(len(ids) - 1) // seq_len)
    logger.info("evaluating split %r: %s tokens in %s blocks of %d (batches of %d) on %s ...",
                split, f"{len(ids):,}", f"{blocks:,}", seq_len, batch_size, dev)
    t0 = time.perf_counter()
    result = evaluate(model, ids, seq_len, batch_size=batch_size, dtype=dtype, device=dev)
    logger.info("evaluated in %.1f s: loss %.4f, ppl %.2f", time.perf_counter() - t0,
                result["loss"], result["ppl"])
    return {"run_dir": str(run_dir), "model": config.get("model"), "dataset": run.data.dataset,
            "split": split, "seq_len": seq_len, "loss": result["loss"], "ppl": result["ppl"],
            "tokens": result["tokens"]}


def run_split_ids(run_dir: str | os.PathLike[str], config: dict[str, Any],
                  tokenizer: Tokenizer, split: str = "valid", data_dir: str | None = None,
                  max_val_rows: int | None = None, all_rows: bool = False,
                  cache_dir: str | None = None) -> np.ndarray:
    """The token ids of ``split`` of a run's corpus (``config``: its ``config.json``), cut as
    in training (same ``max_val_rows`` unless overridden) and encoded by the run's
    ``tokenizer``, checked as :func:`evaluate_run` says."""
    run = run_settings(config, run_dir)
    logger.info("reading split %r of %s for %s ...", split, run.data.dataset, run_dir)
    data: DataConfig = run.data
    rows = None if all_rows else (max_val_rows if max_val_rows is not None
                                  else data.max_val_rows)
    data = DataConfig(dataset=data.dataset, data_dir=data.data_dir,
                      max_train_rows=data.max_train_rows, max_val_rows=rows,
                      seq_len=data.seq_len, use_hub=data.use_hub)
    loaded = load_data(data, TokenizerConfig(**run.tokenizer.to_dict()), DistContext(),
                       cache_dir=cache_dir, tokenizer=tokenizer, splits=(split,),
                       data_dir=data_dir)
    ids: np.ndarray = loaded.ids[split]
    corpus = loaded.corpus
    if rows == run.data.max_val_rows or split == "train":
        check_recorded_split(run_dir, config, split, corpus.fingerprint(split),
                             corpus.files.get(split), int(len(ids)))
    else:  # another row cut: check the text of the run's own cut
        own = load_corpus(data.dataset, data_dir if data_dir is not None else data.data_dir,
                          data.max_train_rows, run.data.max_val_rows, use_hub=data.use_hub)
        if split in own.splits:
            check_recorded_split(run_dir, config, split, own.fingerprint(split),
                                 own.files.get(split))
    if len(ids) < 2:
        raise ValueError(f"split {split!r} of {data.dataset!r} has {len(ids)} token(s); at "
                         f"least 2 are needed to evaluate")
    return ids
