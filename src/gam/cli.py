"""The ``gam`` command: train, evaluate, sample from, benchmark and export language models.

    gam train --model gam --model-preset cpu-small --dataset wikitext2 --data-dir DATA
    gam train --resume runs/gam-wikitext2-20250101-120000
    gam eval RUN_DIR [--split test]
    gam generate RUN_DIR --prompt "The history of" --max-new-tokens 100
    gam bench ...       (forwarded to gam.bench.main)
    gam export ...      (forwarded to gam.hf.export.main)

Multi-process training: ``torchrun --nproc-per-node N -m gam train ...``.

Errors the user can fix (missing data, bad numbers, corrupted checkpoint...) are printed as
``gam: error: ...`` with exit status 2 and no traceback; a diverged run (NaN/inf loss) exits
with status 3, an interrupted one with 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from gam import __version__
from gam.data import eot_token_id
from gam.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    ignore_file_size_signal,
    print_user_error,
    run_reporting_errors,
)
from gam.models.io import CheckpointError
from gam.runtime import resolve_device, set_threads
from gam.training import (
    RuntimeOptions,
    TrainConfig,
    TrainingDivergedError,
    evaluate_run,
    load_run,
    resume,
    train,
)
from gam.training.argtypes import nonneg_int as _nonneg_int
from gam.training.argtypes import number as _number
from gam.training.argtypes import (
    output_folder,
    seed,
    thread_count,
    utf8_text,
)
from gam.training.argtypes import positive_int as _positive_int
from gam.training.config import DEVICES, DTYPES, RunConfig
from gam.training.options import (
    add_setting_arguments,
    format_default,
    options_given,
    run_config_from_settings,
    run_settings,
    setting_key,
)
from gam.training.rundir import default_run_dir

__all__ = ["PROG", "build_parser", "build_run_config", "main", "stream_text"]

PROG = "gam"
EXIT_DIVERGED = 3

# train options that --resume accepts (how to run, not what: RuntimeOptions, and where the data
# lives now); everything else is the run's own
RESUME_OPTIONS = {setting_key(f) for f in fields(RuntimeOptions)} | {"data_dir"}
# ... and what may change the run's length (extend a finished run)
RESUME_LENGTH_OPTIONS = {"max_steps", "epochs"}

# the defaults below are TrainConfig's (filled in by TRAIN_EPILOG)
_TRAIN_EPILOG = (
    "defaults are the paper's recipe (as its official code): blocks of 256 tokens (the model's\n"
    "max_seq_len), global batch {batch_size}, AdamW lr {lr} betas {betas} eps {eps} and weight "
    "decay {weight_decay} on\nEVERY parameter (--decay-filter {decay_filter}), {warmup_steps} "
    "linear warm-up steps then cosine decay to --min-lr ({min_lr})\nover the run ({epochs} "
    "epochs, or --max-steps if smaller), gradient clipping {grad_clip}, {dtype}." + """
--decay-filter nanogpt (alias --no-decay-norms-biases-embeddings) exempts norms, biases and
the embeddings (the token embedding is also the tied output head) from weight decay, as
minGPT/nanoGPT's configure_optimizers did.

data: corpus -> BPE tokenizer (trained on the train split only unless
--tokenizer-on-all-splits; cached under $GAM_CACHE_DIR or ~/.cache/gam) -> token ids (cached)
-> blocks of --seq-len -> batches in an order fixed by (--seed, epoch). Named corpora are read
from --data-dir, else $GAM_DATA_DIR, else the Hugging Face hub (unless --no-use-hub).

run directory (--out, default runs/<model>-<dataset>-<timestamp>): config.json,
metrics.jsonl, model.json + model.safetensors (gam.load_pretrained(RUN_DIR) works),
tokenizer.json and checkpoint/ (saved every --save-every steps, at every epoch end and at the
end, atomically). --resume RUN_DIR continues a stopped or killed run exactly (bit for bit on
CPU); only --data-dir, --threads, --device, --tf32, --cache-dir, --quiet, --wandb, --tensorboard
may be given with it, and --max-steps / --epochs to change its length: e.g. --resume RUN_DIR
--max-steps 1000 extends a finished 500-step run. The new total replaces the recorded one and
the cosine is recomputed to end there, continuing from the LR the new schedule gives at the
current step (the warm-up is not redone; at the old end the LR was at --min-lr, so it rises
again): the result is not the run a 1000-step training would have given.
--resume refuses (and changes nothing) when the run saved a checkpoint that has gone missing;
a run's model.safetensors / model.json that are missing or corrupted are rewritten from the
checkpoint.

multi-process: torchrun --nproc-per-node N -m gam train ... (DDP; gloo on CPU, nccl on GPU;
--batch-size stays the global batch and must be divisible by N * --grad-accum). With
--strategy fsdp the parameters, gradients and optimizer state are sharded over the processes
(FSDP2) and the checkpoints too (torch.distributed.checkpoint, beside the whole
model.safetensors).
""")
_RECIPE = TrainConfig()
TRAIN_EPILOG = _TRAIN_EPILOG.format(**{
    **vars(_RECIPE), **{k: format_default(getattr(_RECIPE, k)) for k in ("lr", "eps", "min_lr")}})


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Gated Associative Memory (arXiv 2509.00605): train, evaluate, "
        "sample, benchmark and export GAM, Transformer and Mamba language models.")
    parser.add_argument("--version", action="version", version=f"gam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_env(sub)
    for name, target in (("bench", "gam.bench.main"), ("export", "gam.hf.export.main")):
        p = sub.add_parser(name, add_help=False,
                           help=f"benchmarks (forwarded to {target}; gam {name} --help)"
                           if name == "bench" else
                           f"export a run to Hugging Face format (forwarded to {target})")
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _add_train(sub: Any) -> None:
    """``gam train``: an option per setting of gam.training.config (help and default from the
    field), plus --dropout, --out and --resume."""
    p = sub.add_parser("train", help="train a model (or --resume a run)",
                       description="Train a language model; see the notes below.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {"model": p.add_argument_group("model"),
              "data": p.add_argument_group("data and tokenizer"),
              "optimisation": p.add_argument_group("optimisation"),
              "logging": p.add_argument_group("logging, evaluation, checkpoints"),
              "hardware": p.add_argument_group("hardware")}
    groups["logging"].add_argument(
        "--out", type=output_folder, default=None,
        help="run directory (default runs/<model>-<dataset>-<timestamp>)")
    groups["logging"].add_argument(
        "--resume", default=None, metavar="RUN_DIR",
        help="continue the run in RUN_DIR exactly from its last checkpoint (default: start a "
             "new run)")
    add_setting_arguments(groups)
    groups["model"].add_argument("--dropout", type=_number, default=None,
                                 help="model dropout (default: preset)")
    p.set_defaults(func=cmd_train)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="token-weighted loss and perplexity of a run (prints JSON)",
                       description="Token-weighted loss (sum of per-token losses / number of "
                       "target tokens) and perplexity of a run's model on a split of its corpus, "
                       "cut into blocks as in training. Prints one JSON object.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", default="valid", help="valid (default) or test")
    p.add_argument("--data-dir", default=None, help="where the corpus lives now "
                   "(default: the run's recorded --data-dir, else $GAM_DATA_DIR, else the "
                   "Hugging Face hub)")
    p.add_argument("--cache-dir", default=None,
                   help="tokenizer / token-id cache (default: $GAM_CACHE_DIR or ~/.cache/gam)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="blocks per batch (default: the run's --eval-batch-size, else its "
                        "--batch-size)")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--max-val-rows", type=_positive_int, default=None,
                      help="first N rows of the split (default: as in training)")
    rows.add_argument("--all-rows", action="store_true",
                      help="the whole split (default: off, the row limit of training)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="fp32 (default); bf16 / fp16: autocast (fp16 on CUDA only)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto (default) = cuda if available, else cpu")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress messages on stderr, only the JSON (default: off)")
    p.set_defaults(func=cmd_eval)


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample text from a run, streamed as it is generated",
                       description="Sample a continuation of --prompt with the run's model "
                       "(cached decoding), printing text as tokens arrive.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", type=utf8_text, default="",
                   help="text to continue (default: start of text)")
    p.add_argument("--max-new-tokens", type=_nonneg_int, default=100,
                   help="tokens to generate at most (default 100; fewer if the end-of-text "
                        "token comes)")
    p.add_argument("--temperature", type=_number, default=1.0,
                   help="sampling temperature, >= 0; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=_positive_int, default=None,
                   help="sample among the K most likely tokens only (default: all)")
    p.add_argument("--top-p", type=_number, default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability "
                        "reaches P, 0 < P <= 1 (default: off)")
    p.add_argument("--seed", type=seed, default=None, help="sampling seed (default: random)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep going after the end-of-text token (default: stop there)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto (default) = cuda if available, else cpu")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch CPU threads (default: torch's, one per core)")
    p.set_defaults(func=cmd_generate)


def _add_env(sub: Any) -> None:
    p = sub.add_parser("env", help="torch / CUDA / TF32 facts and the kernel each model's ops "
                                   "use on this machine",
                       description="What this machine runs: torch, CUDA and TF32 facts, the "
                       "optional CUDA kernels installed (the [cuda] extra), and for every "
                       "registered model family which kernel each of its ops uses on the CPU "
                       "and, if present, on CUDA (the table every benchmark's results.json "
                       "records).")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_env)


# ---------------------------------------------------------------------------------- commands
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a plain StreamHandler
    keeps the stream of the moment it was made, e.g. one a test harness has since closed)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if quiet or rank != 0 else logging.INFO
    log = logging.getLogger("gam")
    if not any(getattr(h, "_gam_cli", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._gam_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def _given(args: argparse.Namespace) -> dict[str, str]:
    """dest -> flag of the options given (not None)."""
    return options_given(args, skip={"command", "func", "resume"})


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of ``gam train`` arguments (defaults filled from the dataclasses)."""
    settings = {k: v for k, v in vars(args).items() if k in run_settings() and v is not None}
    overrides = dict(settings.pop("model_arg", None) or [])
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    return run_config_from_settings({**settings, "model_arg": overrides})


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    """The RuntimeOptions of ``gam train`` arguments."""
    return RuntimeOptions(**{f.name: getattr(args, setting_key(f)) for f in fields(RuntimeOptions)
                             if getattr(args, setting_key(f), None) is not None})


def cmd_train(args: argparse.Namespace) -> int:
    _setup_logging(bool(args.quiet))
    options = runtime_options(args)
    if args.resume is not None:
        given = _given(args)
        extra = sorted(set(given) - RESUME_OPTIONS - RESUME_LENGTH_OPTIONS)
        if extra:
            flags = ", ".join(given[k] for k in extra)
            raise ValueError(f"--resume continues {args.resume} with its saved settings; these "
                             f"options cannot be changed: {flags} (only the run's length, with "
                             f"--max-steps or --epochs)")
        result = resume(args.resume, options, max_steps=args.max_steps, epochs=args.epochs,
                        data_dir=args.data_dir)
    else:
        run = build_run_config(args)
        if run.data.dataset.startswith("text:") and run.data.dataset[5:]:
            # recorded absolute, so that eval / resume work from any directory
            run.data.dataset = "text:" + str(Path(run.data.dataset[5:]).expanduser().resolve())
        run = run.with_data_dir(args.data_dir)
        out = args.out or default_run_dir(run.model, run.data.dataset)
        result = train(run, out, options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.to_dict()), flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _setup_logging(bool(args.quiet))  # progress on stderr: loading and evaluating take a while
    set_threads(args.threads)
    result = evaluate_run(args.run_dir, split=args.split, data_dir=args.data_dir,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                          max_val_rows=args.max_val_rows, all_rows=args.all_rows,
                          cache_dir=args.cache_dir)
    print(json.dumps(result), flush=True)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from gam.bench.environment import format_system_report, system_report

    report = system_report()
    print(json.dumps(report, indent=1) if args.json else format_system_report(report),
          flush=True)
    return 0


def stream_text(tokenizer: Any, prompt_ids: list[int], tokens: Any) -> Any:
    """Yield text pieces of the continuation as token ids arrive from ``tokens``.

    The accumulated ids are decoded each time and only the new suffix is yielded, so a
    multi-byte character split over several byte-level tokens comes out whole (a trailing
    U+FFFD, an incomplete character, is held back until it completes)."""
    prefix = tokenizer.decode(prompt_ids) if prompt_ids else ""
    generated: list[int] = []
    shown = ""
    for token in tokens:
        generated.append(int(token))
        full = tokenizer.decode(prompt_ids + generated)
        text = full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(generated)
        stable = text.rstrip("\ufffd")
        if stable.startswith(shown) and len(stable) > len(shown):
            yield stable[len(shown):]
            shown = stable
    full = tokenizer.decode(prompt_ids + generated)
    text = full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(generated)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]


def check_generate_args(args: argparse.Namespace) -> None:
    """ValueError naming the option for sampling settings the model would reject later (after
    the prompt was already printed)."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"temperature (--temperature) must be a number >= 0 (0 = greedy), "
                         f"got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"top_p (--top-p) must be in (0, 1], got {args.top_p}")


def cmd_generate(args: argparse.Namespace) -> int:
    check_generate_args(args)  # before anything is loaded or printed
    set_threads(args.threads)
    device = resolve_device(args.device)
    model, tokenizer, _ = load_run(args.run_dir, map_location=device)
    try:
        eos = eot_token_id(tokenizer)
    except ValueError:
        eos = None
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids if args.prompt \
        else []
    limit = model.config.max_seq_len
    if len(prompt_ids) > limit:
        print(f"{PROG}: note: the prompt has {len(prompt_ids)} tokens; the model sees only its "
              f"last {limit} (max_seq_len)", file=sys.stderr, flush=True)
    start = prompt_ids[-limit:] if prompt_ids else [eos if eos is not None else 0]
    idx = torch.tensor([start], dtype=torch.long, device=device)

    def tokens() -> Any:
        for token in model.generate_stream(
                idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, eos_token_id=None if args.ignore_eos else eos,
                seed=args.seed):
            t = int(token[0])
            if not args.ignore_eos and eos is not None and t == eos:
                return
            yield t

    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    with warnings.catch_warnings(record=True) as caught:
        # the library's warning would land mid-text with a source line: a note comes after it
        warnings.filterwarnings("always", message="generation passed max_seq_len")
        for piece in stream_text(tokenizer, prompt_ids, tokens()):
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    cropped = [w for w in caught if "generation passed max_seq_len" in str(w.message)]
    for w in caught:
        if w not in cropped:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if cropped:
        print(f"{PROG}: note: the text grew past the model's max_seq_len ({limit} tokens); "
              f"from there on each token saw only the last {limit}", file=sys.stderr,
              flush=True)
    return 0


def _forward(command: str, argv: list[str]) -> int:
    # looked up when the command runs: the benchmarks load their command modules on demand, and
    # the export needs transformers (optional)
    module_name = "gam.bench" if command == "bench" else "gam.hf.export"
    try:
        module = importlib.import_module(module_name)
        entry = module.main
    except (ImportError, AttributeError) as e:
        print(f"{PROG}: error: 'gam {command}' is not available: {module_name}.main could not "
              f"be imported ({e})", file=sys.stderr)
        return EXIT_ERROR
    prog = f"{PROG} {command}" + (f" {argv[0]}" if command == "bench" and argv
                                  and not argv[0].startswith("-") else "")
    return run_reporting_errors(prog, lambda: entry(argv))


# -------------------------------------------------------------------------------------- main
# what to lower when memory runs out, per command
MEMORY_HINTS = {
    "train": "a smaller --batch-size (or --grad-accum N), --seq-len or model "
             "(--model-arg d_model=... / max_seq_len=...)",
    "eval": "a smaller --batch-size",
    "generate": "a shorter --prompt or fewer --max-new-tokens",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gam`` command; returns the exit status.

    Errors follow :mod:`gam.errors`' rule: what the user can fix (bad values, missing files,
    a full disk, too little memory, a corrupted checkpoint) is one line with status 2; any
    other exception is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ignore_file_size_signal()
    if argv and argv[0] in ("bench", "export"):
        return _forward(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)

    try:
        return int(args.func(args) or 0)
    except TrainingDivergedError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except BrokenPipeError:  # e.g. `gam generate ... | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; a run continues from its last checkpoint with "
              f"'gam train --resume RUN_DIR'", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - a user's error is one line, a bug is re-raised
        if print_user_error(PROG, e, MEMORY_HINTS.get(args.command, "less memory"),
                            also=(CheckpointError,)):
            return EXIT_ERROR
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
