"""Multi-query associative recall (MQAR) data, the task of the zoology benchmark (Arora et al.
2023, "Zoology: measuring and improving recall in efficient language models"): key-value pairs,
then queries of the keys; targets only at query positions. ``gam bench recall`` trains on it.
"""

from __future__ import annotations

import torch

from gam.constants import IGNORE_INDEX


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
