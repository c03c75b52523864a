"""``metrics.jsonl``: one JSON object per line, appended as training goes.

Record kinds (field ``kind``):

- ``train``: ``step, epoch, loss, lr, grad_norm, tokens_per_s, elapsed_s`` (one per logged
  step; ``loss`` is the mean over the global batch and all processes);
- ``eval``: ``step, epoch, epoch_end, val_loss, val_ppl, val_tokens, epoch_time_s,
  tokens_per_s, train_time_s, eval_time_s`` and, for GAM with gates, ``gates`` (per layer
  mean/std of the sigmoid gates);
- ``resume``: a run was resumed from the checkpoint at ``step``;
- ``diverged``: the loss became NaN/inf at ``step``; training stopped.

Non-finite numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so every line
is standard JSON. Optional mirrors: TensorBoard (``--tensorboard``) and Weights & Biases
(``--wandb``), only if those packages are installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gam.files import atomic_write_bytes
from gam.training.rundir import METRICS_FILE


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (or of ``RUN_DIR/metrics.jsonl``), optionally of one
    kind. A torn last line (a kill mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
            records.append(record)
    return records


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """Keep only the records of steps ``<= max_step`` (what a resumed run has not redone)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= max_step]
    data = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write_bytes(path, data.encode())


def check_optional_loggers(wandb: bool, tensorboard: bool) -> None:
    """ValueError naming the missing package if an optional logger cannot be used."""
    if wandb:
        try:
            import wandb as _  # noqa: F401
        except ImportError as e:
            raise ValueError("--wandb needs the wandb package, which is not installed "
                             "(pip install wandb)") from e
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter as _  # noqa: F401
        except ImportError as e:
            raise ValueError("--tensorboard needs the tensorboard package, which is not "
                             "installed (pip install tensorboard)") from e


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (flushed per line) and mirrors scalars to the
    optional loggers. Inactive (writes nothing) on non-zero ranks."""

    def __init__(self, run_dir: str | Path, active: bool = True, wandb: bool = False,
                 tensorboard: bool = False, run_config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.active = active
        self._file = None
        self._tb = None
        self._wandb = None
        if not active:
            return
        check_optional_loggers(wandb, tensorboard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb:
            import wandb as wb

            self._wandb = wb.init(project="gam", name=Path(run_dir).name, dir=str(run_dir),
                                  config=run_config or {}, resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        if not self.active or self._file is None:
            return
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()
        step = int(record.get("step", 0))
        prefix = record.get("kind", "train")
        scalars = {f"{prefix}/{k}": float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for layer in record.get("gates", []) or []:
            for k, v in layer.items():
                if k != "layer":
                    scalars[f"gates/layer{layer['layer']}/{k}"] = float(v)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
