"""``gam export RUN_DIR OUT_DIR``: a ``gam train`` run directory -> a Hugging Face model folder.

The run directory holds ``model.json`` + ``model.safetensors`` (``gam.load_pretrained``),
``tokenizer.json`` (a ``tokenizers`` file) and the run's ``config.json`` (its ``tokenizer.kind``,
``"bytelevel"`` or ``"paper"``, picks the special tokens). The output folder holds the model
(``config.json``, ``model.safetensors``, ``generation_config.json``), a
``PreTrainedTokenizerFast``, a short model card and two remote-code entry points
(``configuration_gam.py``, ``modeling_gam.py``, named by ``auto_map`` in ``config.json``), so that,
offline::

    import gam.hf
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    pipeline("text-generation", model=out_dir)("Once upon a time", max_new_tokens=20)

and, without importing ``gam`` (tools such as ``lm_eval --model hf`` that only know transformers),
``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)``. The entry points only
import the installed ``gam`` package, so the model code is never copied into the folder; every
``save_pretrained`` of the model writes them again (a fine-tuned copy keeps them).

Every registered family converts (``HF_MODEL_NAMES``: GAM and its variants, the Transformer,
Mamba, and families added to the registry later).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import GenerationConfig, PreTrainedTokenizerFast

from gam.errors import EXIT_INTERRUPTED, one_line
from gam.files import default_mode, mkdtemp_default_mode
from gam.hf.configuration_gam import AUTO_MAP, HF_MODEL_NAMES, REMOTE_CODE
from gam.hf.modeling_gam import GAMForCausalLM
from gam.models.io import MODEL_JSON, CheckpointError, load_model_config, load_pretrained
from gam.models.registry import count_parameters
from gam.training.metrics import read_metrics
from gam.training.rundir import (
    METRICS_FILE,
    TOKENIZER_FILE,
    check_run_files,
    read_run_config_if_any,
)

__all__ = ["AUTO_MAP", "REMOTE_CODE", "build_tokenizer", "export_run", "main"]

#: The tokenizer class every supported transformers reads from tokenizer_config.json
#: (transformers 5 writes its own name, TokenizersBackend, which 4.x does not have).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"

#: Hub id and license of the corpora gam trains on (gam.data.KNOWN_CORPORA), for the card.
CORPUS_CARDS: dict[str, tuple[str | None, str]] = {
    "wikitext2": ("Salesforce/wikitext", "cc-by-sa-3.0"),
    "wikitext2-tokens": ("Salesforce/wikitext", "cc-by-sa-3.0"),
    "tinystories": ("roneneldan/TinyStories", "cdla-sharing-1.0"),
    "austen": (None, "public domain (Jane Austen's novels)"),
}

# Special tokens of the two tokenizer kinds of gam.data.tokenizer.
SPECIAL_TOKENS: dict[str, dict[str, str | None]] = {
    # GPT-2 style: one end-of-text token serves as bos, eos and (absent a pad token) pad.
    "bytelevel": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": None, "pad_token": None},
    "paper": {"bos_token": "[SOS]", "eos_token": "[EOS]", "unk_token": "[UNK]",
              "pad_token": "[PAD]"},
}


def _tokenizer_kind(run_config: dict[str, Any], tokenizer: Tokenizer, path: Path) -> str:
    """The run config's tokenizer kind, or the kind whose end-of-text token the vocabulary has."""
    kind = (run_config.get("tokenizer") or {}).get("kind")
    if kind is not None:
        if kind not in SPECIAL_TOKENS:
            raise ValueError(f"unknown tokenizer kind {kind!r} in the run config; expected one of "
                             f"{sorted(SPECIAL_TOKENS)}")
        return kind
    for kind, specials in SPECIAL_TOKENS.items():
        if tokenizer.token_to_id(specials["eos_token"]) is not None:
            return kind
    raise ValueError(f"{path} has no end-of-text token ('<|endoftext|>' or '[EOS]'); it is not a "
                     "gam tokenizer")


def build_tokenizer(tokenizer_path: str | Path, kind: str | None = None,
                    model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` around a gam ``tokenizer.json``, with the special tokens of
    its kind (pad = eos when the kind has no pad token) and left padding (for batched
    generation)."""
    path = Path(tokenizer_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run directory has no tokenizer")
    tokenizer = Tokenizer.from_file(str(path))
    kind = _tokenizer_kind({"tokenizer": {"kind": kind}}, tokenizer, path)
    specials = dict(SPECIAL_TOKENS[kind])
    missing = sorted({t for t in specials.values() if t is not None
                      and tokenizer.token_to_id(t) is None})
    if missing:
        raise ValueError(f"{path} lacks the {kind!r} special token(s) {missing}")
    if specials["pad_token"] is None:
        specials["pad_token"] = specials["eos_token"]
    kwargs: dict[str, Any] = {k: v for k, v in specials.items() if v is not None}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left",
                                   clean_up_tokenization_spaces=False, **kwargs)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | os.PathLike[str]) -> None:
    """``tokenizer.save_pretrained(folder)`` with ``tokenizer_class`` set to a class every
    supported transformers has (``TOKENIZER_CLASS``), so a folder written under one release
    loads its tokenizer under the others, and without asking to run remote code."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    values = json.loads(path.read_text())
    values["tokenizer_class"] = TOKENIZER_CLASS
    values.pop("auto_map", None)
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def _card_scores(run_dir: Path) -> list[dict[str, Any]]:
    """The run's evaluation records (validation loss / perplexity), oldest first."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    try:
        return read_metrics(path, kind="eval")
    except ValueError:  # a damaged metrics file: the card just has no scores
        return []


def _model_card(name: str, run_dir: Path, out_dir: Path, model: GAMForCausalLM, kind: str,
                run_config: dict[str, Any]) -> str:
    """README.md: hub metadata (license, datasets, pipeline_tag), the family and size, the
    training data and its license, the recipe (the run's settings), the run's validation
    scores and code that loads this folder."""
    c = model.config
    params = count_parameters(model.gam)
    dataset = (run_config.get("data") or {}).get("dataset")
    hub_id, data_license = CORPUS_CARDS.get(dataset, (None, "unknown")) if dataset \
        else (None, "unknown")
    meta = ["library_name: transformers", "pipeline_tag: text-generation",
            "license: apache-2.0", f"tags: [gam, {name}, causal-lm]"]
    if hub_id:
        meta.append(f"datasets: [{hub_id}]")
    data_line = (f"`{dataset}` ({hub_id or 'not on the hub'}; license: {data_license})"
                 if dataset else "not recorded (the run directory has no run config)")
    # "preset", "model_overrides": the names runs recorded before "model_preset", "model_arg"
    recipe = {k: run_config[k] for k in ("model", "model_preset", "preset", "model_arg",
                                         "model_overrides", "data", "tokenizer", "train", "seed")
              if k in run_config}
    scores = _card_scores(run_dir)
    if scores:
        last = scores[-1]
        score_lines = "\n".join(
            f"| {r.get('step')} | {r.get('epoch')} | {r.get('val_loss', float('nan')):.4f} | "
            f"{r.get('val_ppl', float('nan')):.2f} |" for r in scores[-5:])
        score_text = (f"Validation of the run (its last {min(len(scores), 5)} evaluations; "
                      f"final perplexity {last.get('val_ppl', float('nan')):.2f}):\n\n"
                      f"| step | epoch | val loss | val ppl |\n|---:|---:|---:|---:|\n"
                      f"{score_lines}")
    else:
        score_text = "The run directory holds no evaluation records (metrics.jsonl)."
    path = str(out_dir)
    return f"""---
{chr(10).join(meta)}
---
# {out_dir.name}: `{name}` language model

A `{name}` model of the [gam](https://arxiv.org/abs/2509.00605) library, exported from the `gam`
run `{run_dir.name}`: {params['total']:,} parameters ({params['non_embedding']:,} without
the embeddings), d_model {c.d_model}, {c.n_layers} layers, context {c.max_seq_len} tokens,
{kind} BPE tokenizer (vocab {c.vocab_size}). The code (the `gam` package) is Apache-2.0.

## Training data

{data_line}.

## Recipe

The run's settings (`config.json` of the run; `gam train` reproduces it):

```json
{json.dumps(recipe, indent=1, sort_keys=True)}
```

## Evaluation

{score_text}

## Use

```python
import gam.hf  # registers the "gam" model type (pip install 'gam[hf]')
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
print(pipeline("text-generation", model=model, tokenizer=tokenizer)("Hello"))
```

Without `import gam.hf` (tools that only know transformers), load it as remote code; the
folder's `modeling_gam.py` imports the installed `gam` package:

```python
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
```

```bash
lm_eval --model hf --model_args pretrained={path},trust_remote_code=True --tasks TASK
```

Context: prompt plus generated tokens must fit in {c.max_seq_len} positions; the generation
config's `max_length` is {c.max_seq_len}, so `generate` and `pipeline` stop there by default,
and asking for more (`max_new_tokens` past it) is a clear error.
"""


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               overwrite: bool = False) -> Path:
    """Convert the ``gam train`` run in ``run_dir`` to a Hugging Face folder ``out_dir``.

    Writes the model (safetensors, tied head stored once, ``auto_map`` for remote code), its
    generation config (token ids, and ``max_length`` = the context), the remote-code entry
    points, the tokenizer (``tokenizer_class`` ``PreTrainedTokenizerFast``) and a model card.
    The folder is written next to ``out_dir`` first and moved into place at the end,
    so a failed export leaves no partial folder. An existing non-empty ``out_dir`` is refused
    unless ``overwrite`` (its files of the same names are then replaced).

    Raises ``FileNotFoundError`` (missing run dir or tokenizer), ``CheckpointError``
    (missing/corrupted weights), ``ValueError`` (an unknown family, inconsistent tokenizer) and
    ``FileExistsError`` (non-empty ``out_dir``).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError("OUT_DIR must differ from RUN_DIR (the export would overwrite the run)")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if (out_dir / MODEL_JSON).is_file():
            raise ValueError(f"{out_dir} holds a gam checkpoint ({MODEL_JSON}); choose another "
                             "OUT_DIR")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to "
                                  "replace its files")

    run_config = read_run_config_if_any(run_dir)
    if run_config:  # a training run: its model and tokenizer must be those it records
        check_run_files(run_dir, run_config)
    name, _ = load_model_config(run_dir)
    if name not in HF_MODEL_NAMES:
        raise ValueError(f"{run_dir} holds a {name!r} model, which this gam does not know "
                         f"(registered: {', '.join(HF_MODEL_NAMES)})")
    lm = load_pretrained(run_dir).float().eval()

    tok_path = run_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} does not exist: the run directory has no tokenizer")
    kind = _tokenizer_kind(run_config, Tokenizer.from_file(str(tok_path)), tok_path)
    tokenizer = build_tokenizer(tok_path, kind, model_max_length=lm.config.max_seq_len)
    if len(tokenizer) > lm.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{lm.config.vocab_size} (vocab_size): they do not belong together")

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    # tokenizer_class: lets pipeline() of transformers 4 find the tokenizer of a model type that
    # AutoTokenizer does not know
    model = GAMForCausalLM.from_gam(lm, tokenizer_class="PreTrainedTokenizerFast", **ids)
    # max_length: the context, so that generate() and pipeline() stop within it by default
    # (an explicit max_new_tokens takes precedence)
    model.generation_config = GenerationConfig(max_length=lm.config.max_seq_len, **ids)
    model.config.auto_map = dict(AUTO_MAP)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_default_mode(out_dir.parent, prefix=f".{out_dir.name}.")
    try:
        model.save_pretrained(tmp)  # with the remote-code entry points
        save_tokenizer(tokenizer, tmp)
        (tmp / "README.md").write_text(_model_card(name, run_dir, out_dir, model, kind,
                                                   run_config))
        for item in tmp.rglob("*"):  # safetensors writes 0600 whatever the umask
            os.chmod(item, default_mode(item.is_dir()))
        if not out_dir.exists():
            os.replace(tmp, out_dir)
        else:
            for item in tmp.iterdir():
                target = out_dir / item.name
                if target.is_dir() and not item.is_dir():
                    raise FileExistsError(f"{target} is a directory; cannot replace it")
                os.replace(item, target)
            tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """``gam export RUN_DIR OUT_DIR [--overwrite]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="gam export",
        description="Convert a `gam train` run directory (any model family) to a Hugging Face "
                    "folder loadable with AutoModelForCausalLM / AutoTokenizer / pipeline after "
                    "`import gam.hf`, or with trust_remote_code=True.")
    parser.add_argument("run_dir", help="the run directory (model.json, model.safetensors, "
                                        "tokenizer.json, config.json)")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty OUT_DIR, replacing files of the same name")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse has printed the message
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        out = export_run(args.run_dir, args.out_dir, overwrite=args.overwrite)
    except KeyboardInterrupt:  # export_run has removed its unfinished folder
        print(f"gam export: interrupted; nothing was written to {args.out_dir}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"gam export: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(f"exported {args.run_dir} -> {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
