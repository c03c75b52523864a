"""``gam bench long``'s records: each finished configuration's row (training and evaluation)
kept as JSON under a key of everything it depends on, read back in place of a run folder that
a later session or another machine does not have (``--records``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from gam.bench import training_bench as tb
from gam.bench.environment import environment
from gam.bench.protocols import Protocol
from gam.bench.runs import RunSpec, comparable_config
from gam.bench.tasks import Configuration, key_text
from gam.data.tokenizer import tokenizer_hash
from gam.files import as_json
from gam.models.registry import model_config
from gam.training.rundir import TOKENIZER_FILE, dataset_slug

# what a record keeps of the machine that evaluated it (gam.bench.environment's fields)
MACHINE_FIELDS = ("device", "gpu", "cpu_model", "threads", "torch", "python")
RECORD_FORMAT = 3  # bump when a record's row changes meaning


def record_of(bench: tb.Benchmark, records: Path, spec: RunSpec, protocol: Protocol,
              evaluation: dict[str, Any]) -> Configuration | None:
    """The record of a configuration: its row, kept under a key of everything the row depends
    on -- the run's configuration as training would build it, the model's whole configuration
    (a family's changed default changes it), the data (tokenizer hash and corpus
    fingerprints) and ``evaluation``, the evaluation settings of its part -- in a file named
    by the key's hash, so that other settings never replace it. None when the corpus cannot
    be prepared (the run reports that)."""
    info = bench.datasets.get(spec.dataset) or bench.prepare(spec.dataset)
    if info.get("status") != "ok":
        return None
    requested = protocol.run_config(spec.model, spec.dataset, spec.seed, spec.overrides, None)
    model = model_config(requested.model, requested.model_preset, **requested.model_kwargs())
    key = {"format": RECORD_FORMAT, "run_config": comparable_config(requested.to_dict()),
           "model_config": as_json(model.to_dict()),
           "data": {"tokenizer_sha256": info["tokenizer_sha256"],
                    "fingerprints": info["fingerprints"]},
           "evaluation": evaluation}
    digest = hashlib.sha256(key_text(key).encode()).hexdigest()[:12]
    path = records / dataset_slug(spec.dataset) / f"{spec.label}-seed{spec.seed}-{digest}.json"
    return Configuration(path, key, nested=True, logged=False)


def unrecordable(row: dict[str, Any], info: dict[str, Any]) -> str | None:
    """Why a finished row cannot be kept under today's data (None: it can): a run folder made
    on another version of the corpus, or with another tokenizer, is reused as it is, but its
    numbers are not those of today's key."""
    made_on = row.get("data_fingerprints") or {}
    if any(made_on.get(s) != f for s, f in info["fingerprints"].items()):
        return "the run was trained on another version of the corpus"
    tokenizer_file = Path(row["run_dir"]) / TOKENIZER_FILE
    try:
        made_with = tokenizer_hash(Tokenizer.from_file(str(tokenizer_file)))
    except Exception as exc:  # noqa: BLE001 - any unreadable tokenizer: not recorded
        return f"its tokenizer {tokenizer_file} cannot be read ({type(exc).__name__})"
    if made_with != info["tokenizer_sha256"]:
        return "the run's tokenizer is not the one its corpus gives today"
    return None


def save_record(bench: tb.Benchmark, record: Configuration, row: dict[str, Any],
                out: Path) -> None:
    """Keep ``row`` in ``record``, with the machine that evaluated it (the timed steps, decode
    speed and memory are that machine's) and its run folder relative to ``--out`` (records are
    shared, paths are not)."""
    why = unrecordable(row, bench.datasets[row["dataset"]])
    if why is not None:
        row["record_error"] = why
        bench.log(f"[{row['model']} seed {row['seed']} on {row['dataset']}] not recorded: {why}")
        return
    env = environment(bench.device, bench.threads)
    kept = {**row, "run_dir": Path(row["run_dir"]).relative_to(out).as_posix(),
            "evaluated_on": {k: env.get(k) for k in MACHINE_FIELDS}}
    record.save(kept)
