"""Load a state_dict of the paper's official code (``GAM_Model``, ``TransformerModel``) into ours.

The official script defines its models in one file; their parameter names differ from ours in a
few places, and its Transformer keeps a (1, 1, T, T) lower-triangular mask buffer
(``attn.bias``) that ours does not need (it uses a causal kernel)::

    official                         gam
    blocks.i.ffn.0 / ffn.2           blocks.i.ffn.fc1 / ffn.fc2        (both families)
    blocks.i.ln_1 / ln_2             blocks.i.ln1 / ln2                (Transformer)
    blocks.i.attn.c_attn / c_proj    blocks.i.attn.qkv / attn.proj     (Transformer)
    blocks.i.attn.bias               (dropped: the causal mask)        (Transformer)

Everything else (embeddings, ``causal_conv``, ``memory_bank``, ``gate``, ``ln1``/``ln2`` of
GAM, ``ln_f``, ``head``) has the same name and shape. Both official models tie the token
embedding to the head, as ours do by default. The sizes are read from the tensors' shapes; the
Transformer's head count is not in the weights (the official default is 8).

Example::

    import torch, gam
    state = torch.load("gam_model.pt", map_location="cpu", weights_only=True)
    model = gam.load_official(state, "gam")      # logits equal the official model's
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gam.models.lm import CausalLM
from gam.models.registry import build_model

OFFICIAL_FAMILIES = ("gam", "transformer")

# (official pattern, our replacement), applied to every key in order
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "gam": [(r"^(blocks\.\d+\.ffn)\.0\.", r"\1.fc1."), (r"^(blocks\.\d+\.ffn)\.2\.", r"\1.fc2.")],
    "transformer": [
        (r"^(blocks\.\d+\.ffn)\.0\.", r"\1.fc1."), (r"^(blocks\.\d+\.ffn)\.2\.", r"\1.fc2."),
        (r"^(blocks\.\d+)\.ln_1\.", r"\1.ln1."), (r"^(blocks\.\d+)\.ln_2\.", r"\1.ln2."),
        (r"^(blocks\.\d+\.attn)\.c_attn\.", r"\1.qkv."),
        (r"^(blocks\.\d+\.attn)\.c_proj\.", r"\1.proj."),
    ],
}
_DROPPED = re.compile(r"^blocks\.\d+\.attn\.bias$")  # the official causal-mask buffer


def _check_family(family: str) -> None:
    if family not in OFFICIAL_FAMILIES:
        raise ValueError(f"unknown official family {family!r}; expected one of "
                         f"{OFFICIAL_FAMILIES}")


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor], family: str = "gam"
                                ) -> dict[str, torch.Tensor]:
    """The official ``state_dict`` with our parameter names (mask buffers dropped)."""
    _check_family(family)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from DataParallel / DDP
        if _DROPPED.match(key):
            continue
        for pattern, replacement in _RENAMES[family]:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def official_config(state_dict: Mapping[str, torch.Tensor], family: str = "gam"
                    ) -> dict[str, Any]:
    """The sizes of an official model, read from its tensors' shapes (converted names)."""
    _check_family(family)
    sd = convert_official_state_dict(state_dict, family)
    required = ["head.weight", "pos_embedding.weight", "blocks.0.ffn.fc1.weight"]
    if family == "gam":  # the sizes only a GAM block has
        required += ["blocks.0.memory_bank", "blocks.0.causal_conv.weight"]
    missing = [key for key in required if key not in sd]
    if missing:
        raise ValueError(f"not an official {family} state_dict: it lacks {missing} (its keys "
                         f"start with {sorted(sd)[:3]})")
    vocab_size, d_model = sd["head.weight"].shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))}
    config: dict[str, Any] = dict(
        vocab_size=int(vocab_size), d_model=int(d_model), n_layers=len(layers),
        max_seq_len=int(sd["pos_embedding.weight"].shape[0]),
        ffn_mult=int(sd["blocks.0.ffn.fc1.weight"].shape[0]) // int(d_model))
    if family == "gam":
        config["num_memory_slots"] = int(sd["blocks.0.memory_bank"].shape[0])
        config["conv_kernel_size"] = int(sd["blocks.0.causal_conv.weight"].shape[-1])
    return config


def load_official(state_dict: Mapping[str, torch.Tensor] | str | Path, family: str = "gam",
                  n_heads: int = 8, **overrides: Any) -> CausalLM:
    """Our model holding the weights of an official ``GAM_Model`` (``family="gam"``) or
    ``TransformerModel`` (``"transformer"``): a ``state_dict`` or the path of a file saved
    with ``torch.save(model.state_dict(), path)``. ``n_heads`` (Transformer only): the
    official ``N_HEAD``; ``overrides`` change other config fields (e.g. ``dropout``).

    Raises ``ValueError`` for an unknown family or a state_dict whose names or shapes are not
    the official model's."""
    _check_family(family)
    if isinstance(state_dict, (str, Path)):
        path = Path(state_dict)
        if not path.is_file():
            raise ValueError(f"official checkpoint {path} does not exist")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state_dict (a mapping of names to tensors), got "
                         f"{type(state_dict).__name__}")
    config = official_config(state_dict, family)
    if family == "transformer":
        config["n_heads"] = n_heads
    fixed = sorted({"init", "tie_embeddings"} & set(overrides))
    if fixed:
        raise ValueError(f"load_official sets {fixed} itself (the official models are tied and "
                         f"their weights replace any init); drop them from the overrides")
    config.update(overrides)
    # init="paper": the official tying (no separate head); the weights are replaced below
    model = build_model(family, "paper", init="paper", tie_embeddings=True, **config)
    sd = convert_official_state_dict(state_dict, family)
    sd.setdefault("token_embedding.weight", sd["head.weight"])
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shapes that disagree with the sizes read from the weights
        raise ValueError(f"the state_dict's shapes do not match an official {family} model: "
                         f"{str(exc).splitlines()[-1].strip()}") from exc
    if missing or unexpected:
        raise ValueError(f"the state_dict does not match an official {family} model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model
