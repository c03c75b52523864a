"""Training, evaluation and run directories for the GAM, Transformer and Mamba language models.

Typical use (the ``gam train`` / ``gam eval`` / ``gam generate`` commands wrap these)::

    from gam.training import RunConfig, DataConfig, TokenizerConfig, TrainConfig, train, load_run

    run = RunConfig(model="gam", model_preset="tiny",
                    data=DataConfig("wikitext2", data_dir="shared/data", max_train_rows=2000),
                    tokenizer=TokenizerConfig(vocab_size=512),
                    train=TrainConfig(batch_size=8, max_steps=50))
    result = train(run, "runs/demo")
    model, tokenizer, config = load_run("runs/demo")

See ``gam.training.rundir`` for the run-directory layout, ``gam.training.trainer`` for the loop and
how exact resume works, ``gam.training.evaluate`` for the token-weighted evaluation.
"""

from gam.training.checkpoint import (
    TrainingState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from gam.training.config import (
    DataConfig,
    RunConfig,
    RuntimeOptions,
    TokenizerConfig,
    TrainConfig,
)
from gam.training.data import EpochBatchSampler, epoch_permutation
from gam.training.diagnostics import gate_statistics, has_gates
from gam.training.evaluate import evaluate
from gam.training.metrics import read_metrics
from gam.training.optim import WarmupCosine, build_optimizer, parameter_groups
from gam.training.run import evaluate_run, load_run
from gam.training.rundir import default_run_dir, is_run_dir, read_run_config
from gam.training.trainer import (
    TrainingDivergedError,
    TrainResult,
    resume,
    train,
)

__all__ = [
    "DataConfig", "EpochBatchSampler", "RunConfig", "RuntimeOptions", "TokenizerConfig",
    "TrainConfig", "TrainResult", "TrainingDivergedError", "TrainingState", "WarmupCosine",
    "build_optimizer", "default_run_dir", "epoch_permutation", "evaluate", "evaluate_run",
    "find_checkpoint", "gate_statistics", "has_gates", "is_run_dir", "load_checkpoint",
    "load_run", "parameter_groups", "read_metrics", "read_run_config", "resume",
    "save_checkpoint", "train",
]
