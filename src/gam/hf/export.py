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
import the installed ``gam`` package, so the model code is never copied into the folder.

Only the GAM families convert (gam, its ablations, gam-delta and its variants: ``HF_MODEL_NAMES``).
"""

from __future__ import annotations

import argparse
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
from gam.hf.configuration_gam import HF_MODEL_NAMES
from gam.hf.modeling_gam import GAMForCausalLM
from gam.models.io import MODEL_JSON, CheckpointError, load_model_config, load_pretrained
from gam.models.registry import count_parameters
from gam.training.rundir import TOKENIZER_FILE, check_run_files, read_run_config_if_any

# trust_remote_code entry points: transformers imports these files from the folder and takes the
# classes named in auto_map; they re-export the installed package's classes, so a folder loaded
# either way gives the same classes (and transformers names `gam` as the package to install).
_REMOTE_CODE_NOTE = ("Entry point for AutoModel*.from_pretrained(..., trust_remote_code=True), "
                     "written by `gam export`.\nNeeds the gam package: pip install 'gam[hf]'.")
REMOTE_CODE: dict[str, str] = {
    "configuration_gam.py": f'"""{_REMOTE_CODE_NOTE}"""\n\n'
                            "from gam.hf.configuration_gam import GAMHFConfig\n\n"
                            '__all__ = ["GAMHFConfig"]\n',
    "modeling_gam.py": f'"""{_REMOTE_CODE_NOTE}"""\n\n'
                       "from gam.hf.modeling_gam import GAMForCausalLM, GAMModel\n\n"
                       '__all__ = ["GAMForCausalLM", "GAMModel"]\n',
}
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_gam.GAMHFConfig",
    "AutoModel": "modeling_gam.GAMModel",
    "AutoModelForCausalLM": "modeling_gam.GAMForCausalLM",
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


def _model_card(name: str, run_dir: Path, model: GAMForCausalLM, kind: str) -> str:
    c = model.config
    params = count_parameters(model.gam)["total"]
    return f"""---
library_name: transformers
tags: [gam, gated-associative-memory, causal-lm]
---
# {name} (Gated Associative Memory)

GAM language model (arXiv 2509.00605) exported from the `gam` run `{run_dir.name}`:
{params:,} parameters, d_model {c.d_model}, {c.n_layers} layers, {c.num_memory_slots} memory
slots, conv kernel {c.conv_kernel_size}, context {c.max_seq_len} tokens, {kind} BPE tokenizer
(vocab {c.vocab_size}).

```python
import gam.hf  # registers the "gam" model type (pip install 'gam[hf]')
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH")
print(pipeline("text-generation", model=model, tokenizer=tokenizer)("Hello", max_new_tokens=20))
```

Without `import gam.hf` (e.g. from tools that only know transformers), load it as remote code;
the folder's `modeling_gam.py` imports the installed `gam` package:

```python
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
```

```bash
lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True --tasks TASK
```

Prompt plus generated tokens must fit in {c.max_seq_len} positions (learned position embeddings).
"""


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               overwrite: bool = False) -> Path:
    """Convert the ``gam train`` run in ``run_dir`` to a Hugging Face folder ``out_dir``.

    Writes the model (safetensors, tied head stored once, ``auto_map`` for remote code), its
    generation config (token ids only: a ``max_length`` there would clash with every
    ``generate(max_new_tokens=...)``), the remote-code entry points, the tokenizer and a
    README. The folder is written next to ``out_dir`` first and moved into place at the end,
    so a failed export leaves no partial folder. An existing non-empty ``out_dir`` is refused
    unless ``overwrite`` (its files of the same names are then replaced).

    Raises ``FileNotFoundError`` (missing run dir or tokenizer), ``CheckpointError``
    (missing/corrupted weights), ``ValueError`` (not a GAM model, inconsistent tokenizer) and
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
        raise ValueError(f"{run_dir} holds a {name!r} model; gam export converts GAM models only "
                         f"({', '.join(HF_MODEL_NAMES)})")
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
    model.generation_config = GenerationConfig(**ids)
    model.config.auto_map = dict(AUTO_MAP)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_default_mode(out_dir.parent, prefix=f".{out_dir.name}.")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(name, run_dir, model, kind))
        for filename, source in REMOTE_CODE.items():
            (tmp / filename).write_text(source)
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
        description="Convert a `gam train` run directory (GAM models) to a Hugging Face folder "
                    "loadable with AutoModelForCausalLM / AutoTokenizer / pipeline after "
                    "`import gam.hf`.")
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
