"""``metrics.jsonl``: one JSON object per line, appended as training goes.

Record kinds (field ``kind``):

- ``train``: ``step, epoch, loss, lr, grad_norm, tokens_per_s, elapsed_s`` (one per logged
  step; ``loss`` is the mean over the global batch and all processes);
- ``eval``: ``step, epoch, epoch_end, val_loss, val_ppl, val_tokens, epoch_time_s,
  tokens_per_s, train_time_s, eval_time_s`` and, for GAM with gates, ``gates`` (per layer
  mean/std of the sigmoid gates);
- ``resume``: a run was resumed from the checkpoint at ``step``;
- ``diverged``: the loss became NaN/inf at ``step``; training stopped.

A kill while a record is written can tear only the last line: readers skip a torn last line,
and ``--resume`` drops it. Any other line that is not a JSON record is kept where it is and
reported with its line number (readers warn; ``--resume``, which rewrites the file, refuses).

Non-finite numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so every line
is standard JSON. Optional mirrors: TensorBoard (``--tensorboard``) and Weights & Biases
(``--wandb``), only if those packages are installed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from gam.files import atomic_write_bytes
from gam.models.io import CheckpointError
from gam.training.rundir import METRICS_FILE

logger = logging.getLogger("gam.training")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any] | None]], bool]:
    """Every line of a ``metrics.jsonl`` with its record (None where it is not a JSON record
    with an integer step), and whether the last line is torn (unreadable: a kill mid-write)."""
    parsed: list[tuple[str, dict[str, Any] | None]] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        ok = isinstance(record, dict) and isinstance(record.get("step", 0), int) \
            and not isinstance(record.get("step", 0), bool)
        parsed.append((line, record if ok else None))
    torn = bool(parsed) and parsed[-1][1] is None
    return parsed, torn


def _bad_lines(parsed: list[tuple[str, dict[str, Any] | None]], torn: bool) -> list[int]:
    """1-based numbers of the unreadable lines but a torn last one."""
    last = len(parsed) - 1 if torn else len(parsed)
    return [i + 1 for i, (_, record) in enumerate(parsed[:last]) if record is None]


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (or of ``RUN_DIR/metrics.jsonl``), optionally of one
    kind. A torn last line (a kill mid-write) is skipped; another unreadable line is skipped
    with a warning naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    parsed, torn = _parse_lines(path)
    bad = _bad_lines(parsed, torn)
    if bad:
        logger.warning("warning: %s line(s) %s are not metrics records; skipped", path,
                       ", ".join(map(str, bad[:10])))
    return [r for _, r in parsed
            if r is not None and (kind is None or r.get("kind") == kind)]


def check_metrics(path: str | Path) -> tuple[list[tuple[str, dict[str, Any] | None]], bool]:
    """The parsed lines of a ``metrics.jsonl`` that ``--resume`` may rewrite and whether its
    last line is torn; CheckpointError naming the file and the line when another line is
    unreadable (rewriting would lose it)."""
    path = Path(path)
    if not path.is_file():
        return [], False
    parsed, torn = _parse_lines(path)
    bad = _bad_lines(parsed, torn)
    if bad:
        raise CheckpointError(
            f"{path} line {bad[0]} is not a metrics record (a JSON object with an integer "
            f"step){f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; resuming would "
            f"drop it: repair or delete that line, then resume")
    return parsed, torn


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """Keep only the records of steps ``<= max_step`` (what a resumed run has not redone),
    dropping a torn last line (:func:`check_metrics` refuses other unreadable lines)."""
    parsed, torn = check_metrics(path)
    kept = [line for line, r in parsed if r is not None and r.get("step", 0) <= max_step]
    if torn or len(kept) != len(parsed):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


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
