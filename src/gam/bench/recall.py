"""``gam bench recall``: multi-query associative recall (MQAR).

The task of the zoology benchmark (Arora et al. 2023, "Zoology: measuring and improving recall
in efficient language models"): a sequence starts with ``P`` key-value pairs
``k1 v1 k2 v2 ... kP vP`` (keys and values drawn without replacement from disjoint halves of
the vocabulary, token 0 excluded), followed by a query region where every key appears once
more, in random order, at a random even offset; the model must predict, at each query position,
the value that was paired with that key. Targets are ``-100`` everywhere else, so accuracy is
measured on query positions only. Positions of the query region that hold no query are random
tokens (zoology's ``random_non_queries``) or 0.

What it shows: recall needs a token to look up information from arbitrarily far back. GAM's
tokens mix only through its causal convolutions (the memory bank is the same learned matrix for
every sequence), so a GAM stack has a receptive field of ``1 + n_layers * (k - 1)`` tokens
(``gam.receptive_field(model)``, 5 for 2 layers with kernel 3) and cannot recall a pair seen
further back than that. Each result row records the receptive field and the fraction of queries
whose pair lies inside it (``reachable``): GAM cannot even copy a value it cannot see, so its
accuracy beyond guessing a value (2/vocab) is bounded by that fraction.
Attention (and, to the extent its state allows, Mamba) sees the whole context.

Protocol (defaults sized for a 2-core CPU, about 4 minutes per model): one small model per
family (``--d-model`` 64, ``--n-layers`` 2, vocab ``--vocab-size`` 64, dropout 0; GAM's memory
has d_model slots, Mamba d_state 16 instead of the tiny preset's 4, the Transformer the tiny
preset's 4 heads) is trained on fresh random batches that cycle through every (length, pairs)
task (``--per-length``: one model per length, as zoology does), with AdamW, gradient clipping
at 1, linear warm-up and cosine decay stretched over ``--max-seconds`` (or ``--steps`` if
reached first), then evaluated per task on ``--eval-examples`` held-out sequences.

Two choices differ from ``build_model``'s defaults, both measured on this task:

- no position embeddings (``pos_embedding=False``; ``--pos-embedding learned`` restores
  them). The shell's learned position embeddings start at N(0, 1), about 14 times the tied token
  embeddings (uniform +-1/sqrt(d) at d 64), so after the first LayerNorm a token's identity is a
  small perturbation of its position: a 2-layer Transformer on T 16 / 2 pairs / vocab 16 stayed
  at the copy plateau (50%) for 3,000 steps, while the same model without position embeddings
  (or with them initialised at std 0.02) solved it in 400. Attention still knows the order
  through the causal mask; GAM and Mamba through their convolutions and recurrence;
- non-query positions hold 0 (``--random-filler`` for zoology's random tokens), so every
  occurrence of a key in the query region is a query.

Expect the copy plateau first: a model that has not yet learned the association scores about
1/P by copying any value of the context; learning the association takes thousands of steps
(zoology trains for tens of thousands), so on a CPU budget the longer or denser tasks may stay
at the plateau for every family: read accuracies against the ``copy`` column. On a GPU raise
``--max-seconds`` / ``--steps``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from gam.bench import common

IGNORE_INDEX = -100
DEFAULT_MODELS = ["gam", "transformer", "mamba"]
DEFAULT_SEQ_LENS = [64, 128, 256, 512]
QUICK_SEQ_LENS = [64, 128]
DEFAULT_PAIRS = [2, 4, 8, 16]
QUICK_PAIRS = [2, 4, 8]


# ----------------------------------------------------------------------------- the data
def make_mqar_batch(batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int = 256,
                    seed: int | None = None, generator: torch.Generator | None = None,
                    random_non_queries: bool = True, power_a: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of MQAR sequences: ``(inputs, targets)``, both (batch_size, seq_len) int64.

    Layout of each row: ``k1 v1 ... kP vP`` (P = ``num_kv_pairs``; keys distinct in
    [1, vocab_size // 2), values distinct in [vocab_size // 2, vocab_size)), then the query
    region ``seq_len - 2P`` tokens long, made of ``(seq_len - 2P) // 2`` slots of two tokens. The
    P keys are placed, in random order, at the first token of P distinct random slots (uniformly,
    or with zoology's power law ``p(slot i) ~ (i+1)^(power_a - 1)`` when ``power_a`` is given).
    ``targets[q] = value of inputs[q]`` at those P query positions and ``-100`` elsewhere
    (no shift needed: the target of position q is what follows it). Other positions of the query
    region hold uniform random tokens (``random_non_queries``, as zoology) or 0.

    Deterministic given ``seed`` (or the state of ``generator``).
    """
    b, t, p, v = batch_size, seq_len, num_kv_pairs, vocab_size
    if p < 1 or b < 1:
        raise ValueError("batch_size and num_kv_pairs must be >= 1")
    if 4 * p > t:
        raise ValueError(f"seq_len {t} is too short for {p} pairs: need seq_len >= 4 * pairs "
                         f"(the pairs plus a query region of at least as many slots)")
    if v // 2 - 1 < p:
        raise ValueError(f"vocab_size {v} has only {v // 2 - 1} keys for {p} pairs")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    half = v // 2
    keys = torch.argsort(torch.rand(b, half - 1, generator=generator), dim=1)[:, :p] + 1
    values = torch.argsort(torch.rand(b, v - half, generator=generator), dim=1)[:, :p] + half
    n_slots = (t - 2 * p) // 2
    if power_a is None:
        weights = torch.ones(b, n_slots)
    else:
        weights = (power_a * torch.arange(1, n_slots + 1, dtype=torch.float64)
                   ** (power_a - 1)).expand(b, n_slots)
    slots = torch.multinomial(weights, p, replacement=False, generator=generator)  # (b, p)
    query_pos = 2 * p + 2 * slots  # (b, p); which key goes to which slot is random already
    if random_non_queries:
        inputs = torch.randint(v, (b, t), generator=generator)
    else:
        inputs = torch.zeros(b, t, dtype=torch.long)
    inputs[:, 0:2 * p:2] = keys
    inputs[:, 1:2 * p:2] = values
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    return inputs, targets


def query_distances(inputs: torch.Tensor, targets: torch.Tensor, num_kv_pairs: int
                    ) -> torch.Tensor:
    """For every query (targets != -100), the distance from the query position back to its key
    in the context (q - 2i for pair i): a model whose receptive field is r tokens can see the
    whole pair only if the distance is at most r - 1."""
    rows, pos = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
    context_keys = inputs[rows, : 2 * num_kv_pairs : 2]  # (n_queries, P)
    match = context_keys == inputs[rows, pos][:, None]
    key_index = match.float().argmax(dim=1)
    return pos - 2 * key_index


def pairs_for_length(seq_len: int, pairs: list[int], vocab_size: int) -> list[int]:
    return [p for p in pairs if 4 * p <= seq_len and p <= vocab_size // 2 - 1]


# ------------------------------------------------------------------------------ training
def _family_overrides(name: str, d_model: int) -> dict[str, Any]:
    """Per-family sizes of the recall models: GAM's memory has d_model slots (the paper's
    ratio); Mamba uses d_state 16 (mamba-ssm's default and the paper's) instead of the tiny
    preset's 4; the Transformer keeps the tiny preset's 4 heads."""
    from dataclasses import fields

    from gam.models.registry import config_class

    known = {f.name for f in fields(config_class(name))}
    wanted = {"num_memory_slots": d_model, "d_state": 16}
    return {k: v for k, v in wanted.items() if k in known}


def build_recall_model(name: str, max_seq_len: int, args: argparse.Namespace):
    from gam.models.registry import build_model

    return build_model(name, "tiny", d_model=args.d_model, n_layers=args.n_layers,
                       vocab_size=args.vocab_size, max_seq_len=max_seq_len, dropout=0.0,
                       pos_embedding=args.pos_embedding == "learned",
                       **_family_overrides(name, args.d_model))


@torch.no_grad()
def evaluate(model, seq_len: int, pairs: int, vocab_size: int, n_examples: int, seed: int,
             device: torch.device, batch_size: int = 128, random_non_queries: bool = False
             ) -> dict[str, Any]:
    """Accuracy on the query positions of ``n_examples`` held-out sequences, and the key
    distance of every query."""
    model.eval()
    correct = total = 0
    distances = []
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < n_examples:
        b = min(batch_size, n_examples - done)
        x, y = make_mqar_batch(b, seq_len, pairs, vocab_size, generator=gen,
                               random_non_queries=random_non_queries)
        logits, _ = model(x.to(device))
        mask = y != IGNORE_INDEX
        pred = logits.argmax(-1).cpu()
        correct += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
        distances.append(query_distances(x, y, pairs))
        done += b
    model.train()
    return {"accuracy": correct / total, "queries": total,
            "distances": torch.cat(distances)}


def lr_factor(progress: float, warmup: float = 0.05, floor: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to ``floor``."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def train_one(name: str, tasks: list[tuple[int, int]], args: argparse.Namespace,
              device: torch.device, seed: int, log_every: int = 0
              ) -> tuple[Any, dict[str, Any]]:
    """Train one model on fresh MQAR batches cycling through ``tasks`` ((seq_len, pairs); the
    batch size of each is tokens_per_step / seq_len). Training progress is the larger of
    step / ``args.steps`` and elapsed / ``args.max_seconds``, so the learning-rate schedule
    (warm-up, cosine) always completes, on a fast or a slow machine; training also stops early
    once the running training accuracy reaches ``args.target_accuracy``."""
    torch.manual_seed(seed)
    max_len = max(t for t, _ in tasks)
    model = build_recall_model(name, max_len, args).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    step, check_acc, stop_reason, progress = 0, None, "steps", 0.0
    recent: list[float] = []
    window = 8 * len(tasks)
    while progress < 1.0:
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(progress)
        seq_len, p = tasks[step % len(tasks)]
        step += 1
        batch = max(4, args.tokens_per_step // seq_len)
        x, y = make_mqar_batch(batch, seq_len, p, args.vocab_size, generator=gen,
                               random_non_queries=args.random_filler)
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        mask = y != IGNORE_INDEX
        loss = F.cross_entropy(logits[mask].float(), y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(float((logits.detach()[mask].argmax(-1) == y[mask]).float().mean()))
        elapsed = time.perf_counter() - t0
        progress = max(step / args.steps, elapsed / args.max_seconds if args.max_seconds
                       else 0.0)
        if log_every and step % log_every == 0:
            print(f"    {name} step {step}: loss {float(loss.detach()):.3f}, training "
                  f"accuracy {sum(recent[-log_every:]) / len(recent[-log_every:]):.3f}, "
                  f"{elapsed:.0f} s", flush=True)
        if len(recent) >= window and step % len(tasks) == 0:
            check_acc = sum(recent[-window:]) / window
            if check_acc >= args.target_accuracy:
                stop_reason = "target accuracy"
                break
    else:
        stop_reason = "steps" if step >= args.steps else "time limit"
    info = {"steps": step, "train_seconds": time.perf_counter() - t0,
            "final_loss": float(loss.detach()), "train_accuracy_recent": check_acc,
            "stop_reason": stop_reason, "tasks": [list(t) for t in tasks],
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, info


# ------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=None, metavar="T",
                        help="sequence lengths (default 64 128 256 512; quick 64 128)")
    parser.add_argument("--num-kv-pairs", nargs="+", type=int, default=None, metavar="P",
                        help="numbers of pairs, those with 4P <= T at each length (default "
                             "2 4 8 16; quick 2 4 8)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=64,
                        help="keys from [1, V/2), values from [V/2, V)")
    parser.add_argument("--pos-embedding", choices=("none", "learned"), default="none",
                        help="the shell's learned position embeddings (N(0,1) at init) or none; "
                             "see the module docstring")
    parser.add_argument("--random-filler", action="store_true",
                        help="fill non-query positions with random tokens (zoology's "
                             "random_non_queries) instead of 0")
    parser.add_argument("--per-length", action="store_true",
                        help="train one model per sequence length (zoology's protocol) "
                             "instead of one model on all lengths")
    parser.add_argument("--steps", type=int, default=None,
                        help="max training steps per model (default 20000; quick 5000)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="training time per model; the schedule is stretched to it "
                             "(default 230; quick 40)")
    parser.add_argument("--tokens-per-step", type=int, default=2048,
                        help="batch size = tokens-per-step / seq_len (at least 4)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--target-accuracy", type=float, default=0.99,
                        help="stop training early when the running training accuracy "
                             "reaches it")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="held-out sequences per (length, pairs) (default 256; quick 128)")
    parser.add_argument("--log-every", type=int, default=0, help="print training progress")


def _markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    s = results["settings"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    keys = list(dict.fromkeys((r["seq_len"], r["num_kv_pairs"]) for r in runs))
    by = {(r["model"], r["seq_len"], r["num_kv_pairs"]): r for r in runs}
    rf = {r["model"]: r.get("receptive_field") for r in runs}

    def cell(m: str, t: int, p: int) -> str:
        r = by.get((m, t, p))
        if r is None:
            return ""
        if r["status"] != "ok":
            return r["status"]
        return f"{100 * r['accuracy']:.1f}"

    def reachable(t: int, p: int) -> str:
        r = next((by[(m, t, p)] for m in models if m.startswith("gam") and (m, t, p) in by
                  and by[(m, t, p)].get("reachable_fraction") is not None), None)
        return "-" if r is None else f"{100 * r['reachable_fraction']:.1f}"

    parts = [f"# gam bench recall: MQAR accuracy on query positions (%), d {s['d_model']}, "
             f"{s['n_layers']} layers, vocab {s['vocab_size']}", "",
             common.environment_markdown(results["environment"], results["command"]), "",
             "Receptive field (tokens): " + ", ".join(
                 f"{m} {rf[m] if rf[m] is not None else '-'}" for m in models)
             + ". GAM mixes tokens only through its causal convolutions "
               "(1 + n_layers x (k - 1) tokens), so it cannot recall a pair further back; "
               "'reachable' is the share of queries whose key and value lie inside GAM's "
               "receptive field. 'copy' is 100/P, the accuracy of copying any value of the "
               "context (the plateau before a model learns the association).", "",
             common.markdown_table(
                 ["T", "pairs", *models, "copy (%)", "reachable for gam (%)"],
                 [[t, p, *(cell(m, t, p) for m in models), f"{100 / p:.1f}", reachable(t, p)]
                  for t, p in keys]), "",
             "## Training", "",
             common.markdown_table(
                 ["model", "lengths", "steps", "seconds", "stop", "final loss"],
                 [[t["model"], " ".join(str(v) for v in t["seq_lens"]), t.get("steps", "-"),
                   common.fmt(t.get("train_seconds"), 0), t.get("stop_reason", t.get("status")),
                   common.fmt(t.get("final_loss"), 3)] for t in results["training"]])]
    return "\n".join(parts)


def _plot(results: dict[str, Any], path) -> None:
    runs = [r for r in results["runs"] if r["status"] == "ok"]
    seq_lens = sorted({r["seq_len"] for r in runs}) or [0]
    fig, axes = common.new_figure(len(seq_lens), width=4.0, height=3.6)
    for ax, t in zip(axes, seq_lens, strict=True):
        for model in dict.fromkeys(r["model"] for r in runs):
            rows = sorted((r for r in runs if r["model"] == model and r["seq_len"] == t),
                          key=lambda r: r["num_kv_pairs"])
            if rows:
                ax.plot([r["num_kv_pairs"] for r in rows], [100 * r["accuracy"] for r in rows],
                        "o-", label=model)
        ps = sorted({r["num_kv_pairs"] for r in runs if r["seq_len"] == t})
        ax.plot(ps, [100 / p for p in ps], "--", color="gray", label="copy a value (1/P)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("key-value pairs")
        ax.set_title(f"T = {t}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("MQAR accuracy (%)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend()
    s = results["settings"]
    fig.suptitle(f"multi-query associative recall, d {s['d_model']}, {s['n_layers']} layers")
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    from gam.models.registry import receptive_field

    device = common.resolve_device(args.device)
    threads = common.setup_threads(args.threads)
    seq_lens = sorted(set(args.seq_lens or (QUICK_SEQ_LENS if args.quick else DEFAULT_SEQ_LENS)))
    all_pairs = sorted(set(args.num_kv_pairs or (QUICK_PAIRS if args.quick else DEFAULT_PAIRS)))
    args.steps = args.steps or (5000 if args.quick else 20000)
    if args.max_seconds is None:
        args.max_seconds = 40.0 if args.quick else 230.0
    n_eval = args.eval_examples or (128 if args.quick else 256)
    tasks = [(t, p) for t in seq_lens for p in pairs_for_length(t, all_pairs, args.vocab_size)]
    if not tasks:
        raise SystemExit("gam bench recall: no (length, pairs) with 4 x pairs <= length")
    groups = ([[tk for tk in tasks if tk[0] == t] for t in seq_lens] if args.per_length
              else [tasks])
    groups = [g for g in groups if g]
    command = common.command_line(args.command, args.argv)
    env = common.environment(device, threads)
    print(f"gam bench recall: models {args.models}, lengths {seq_lens}, pairs {all_pairs}, "
          f"d {args.d_model}, {args.n_layers} layers, vocab {args.vocab_size}, "
          f"{len(groups)} model(s) per family, <= {args.max_seconds:g} s / {args.steps} steps "
          f"each, device {device}, {threads} threads", flush=True)
    runs: list[dict[str, Any]] = []
    training: list[dict[str, Any]] = []
    for mi, name in enumerate(args.models):
        reason = common.model_available(name)
        for gi, group in enumerate(groups):
            lens = sorted({t for t, _ in group})
            if reason is not None:
                training.append({"model": name, "seq_lens": lens, "status": "unavailable",
                                 "error": reason})
                runs += [{"model": name, "seq_len": t, "num_kv_pairs": p,
                          "status": "unavailable", "accuracy": None, "error": reason}
                         for t, p in group]
                continue
            try:
                model, info = train_one(name, group, args, device,
                                        seed=args.seed + 1000 * mi + gi,
                                        log_every=args.log_every)
            except Exception as exc:  # noqa: BLE001 - recorded
                status = "oom" if common.is_oom_error(exc) else "error"
                training.append({"model": name, "seq_lens": lens, "status": status,
                                 "error": f"{type(exc).__name__}: {exc}"})
                runs += [{"model": name, "seq_len": t, "num_kv_pairs": p, "status": status,
                          "accuracy": None, "error": str(exc)[:300]} for t, p in group]
                print(f"  {name} T={lens}: {status}: {exc}", flush=True)
                continue
            rf = receptive_field(model)
            training.append({"model": name, "seq_lens": lens, "status": "ok", **info})
            for t, p in group:
                ev = evaluate(model, t, p, args.vocab_size, n_eval,
                              seed=10_000_000 + args.seed + 97 * t + p, device=device,
                              random_non_queries=args.random_filler)
                dist = ev.pop("distances")
                runs.append({"model": name, "seq_len": t, "num_kv_pairs": p, "status": "ok",
                             "accuracy": ev["accuracy"], "queries": ev["queries"],
                             "receptive_field": rf,
                             "reachable_fraction": float((dist <= rf - 1).float().mean()),
                             "chance": 1.0 / p, "train_steps": info["steps"]})
            accs = ", ".join(f"T{r['seq_len']}/P{r['num_kv_pairs']} {100 * r['accuracy']:.0f}%"
                             for r in runs[-len(group):])
            print(f"  {name:<12} rf {rf:<4} {info['steps']} steps ({info['train_seconds']:.0f} "
                  f"s, {info['stop_reason']}): {accs}", flush=True)
            del model
    results = {
        "command": command,
        "settings": {"models": list(args.models), "seq_lens": seq_lens, "pairs": all_pairs,
                     "tasks": [list(t) for t in tasks], "per_length": args.per_length,
                     "d_model": args.d_model, "n_layers": args.n_layers,
                     "vocab_size": args.vocab_size, "pos_embedding": args.pos_embedding,
                     "random_filler": args.random_filler, "steps": args.steps,
                     "max_seconds": args.max_seconds, "tokens_per_step": args.tokens_per_step,
                     "lr": args.lr, "weight_decay": args.weight_decay,
                     "target_accuracy": args.target_accuracy, "eval_examples": n_eval,
                     "quick": args.quick, "seed": args.seed,
                     "task": "MQAR (zoology): P key-value pairs, then every key queried once "
                             "at a random even offset of the rest; accuracy on query positions "
                             "only"},
        "runs": runs,
        "training": training,
        "environment": common.finish_environment(env),
    }
    out = common.write_results(args.out, results, _markdown(results))
    _plot(results, out / "recall.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'recall.png'}")
    return 0
