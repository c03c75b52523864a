"""Which kernel every registered family's every op would use on a device, for ``gam env`` and
the ``environment`` block of every benchmark's ``results.json``.

A family's ops are found by running it: a forward pass, a prefill and one decoding step of a
one-layer model with the ``paper`` preset's widths (vocab cut to 256, weights left
uninitialised: only the shapes matter) on the CPU, in fp32 and under bf16 autocast, while
``kernels.recording()`` collects each op's call (its compute dtype and shapes). Each call is
then answered by ``kernels.choose`` for the asked device, so a family added to the registry
joins by itself, and the table says what the dispatch code would do there.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from gam.models.ops import kernels
from gam.models.registry import MODELS, build_model

DTYPE_NAMES = {"fp32": None, "bf16": torch.bfloat16}
PROBE_PRESET = "paper"
PROBE_OVERRIDES = {"n_layers": 1, "vocab_size": 256}
PROBE_TOKENS = 8


@functools.cache
def _family_calls(name: str) -> dict[str, tuple[tuple[Any, ...], ...]]:
    """Per dtype name, the (op, device_type, dtype, shapes) calls of one family."""
    with torch.device("meta"):
        model = build_model(name, PROBE_PRESET, **PROBE_OVERRIDES)
    model = model.to_empty(device="cpu").eval()
    idx = torch.zeros(1, PROBE_TOKENS, dtype=torch.long)
    calls = {}
    for dtype_name, autocast in DTYPE_NAMES.items():
        with kernels.recording() as seen, torch.no_grad(), \
                torch.autocast("cpu", dtype=autocast or torch.bfloat16,
                               enabled=autocast is not None):
            model(idx, return_logits=False)
            _, cache = model.prefill(idx[:, :-1])
            model.step(idx[:, -1], cache)
        calls[dtype_name] = tuple(sorted(seen, key=repr))
    return calls


def family_kernels(name: str, device_type: str) -> dict[str, dict[str, str]]:
    """``{op: {dtype name: kernel}}`` of one registered family on ``device_type``; an op that
    runs several times with different shapes lists every distinct answer ("a / b")."""
    table: dict[str, dict[str, str]] = {}
    for dtype_name, calls in _family_calls(name).items():
        for op, _, dtype, shapes in calls:
            choice = kernels.choose(op, device_type, dtype, **dict(shapes))
            row = table.setdefault(op, {})
            answers = row.get(dtype_name, "").split(" / ") if dtype_name in row else []
            if choice not in answers:
                row[dtype_name] = " / ".join([*answers, choice])
    return dict(sorted(table.items()))


def kernel_table(device_type: str, families: list[str] | None = None) -> dict[str, Any]:
    """Every (or each given) registered family's ops and kernels on ``device_type``, the fast
    kernels installed (with versions) and any disabled after failing."""
    out: dict[str, Any] = {}
    for name in families or MODELS:
        try:
            out[name] = family_kernels(name, device_type)
        except Exception as exc:  # a family that cannot be probed says so, the rest report
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return {"device_type": device_type, "families": out, "installed": kernels.installed(),
            "disabled": kernels.disabled_reasons()}
