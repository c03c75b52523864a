"""Official checkpoints: a state_dict in the official code's layout loads into our models and
gives the official forward's logits. The official forward is written here from the paper's
equations, on the official parameter names, independently of gam's modules."""

import math

import pytest
import torch
import torch.nn.functional as F

import gam
from gam.models.official import convert_official_state_dict, load_official, official_config

V, T_MAX, C, L, S, K, H = 50, 16, 24, 2, 10, 3, 4


def _official_gam_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    r = lambda *shape: 0.3 * torch.randn(*shape, generator=generator)  # noqa: E731
    head = r(V, C)
    sd = {"token_embedding.weight": head, "head.weight": head, "pos_embedding.weight": r(T_MAX, C),
          "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(L):
        p = f"blocks.{i}."
        sd.update({p + "causal_conv.weight": r(C, 1, K), p + "causal_conv.bias": r(C),
                   p + "memory_bank": r(S, C), p + "gate.weight": r(2 * C, C),
                   p + "gate.bias": r(2 * C), p + "ffn.0.weight": r(4 * C, C),
                   p + "ffn.0.bias": r(4 * C), p + "ffn.2.weight": r(C, 4 * C),
                   p + "ffn.2.bias": r(C), p + "ln1.weight": 1 + r(C), p + "ln1.bias": r(C),
                   p + "ln2.weight": 1 + r(C), p + "ln2.bias": r(C)})
    return sd


def _official_transformer_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    r = lambda *shape: 0.3 * torch.randn(*shape, generator=generator)  # noqa: E731
    head = r(V, C)
    sd = {"token_embedding.weight": head, "head.weight": head, "pos_embedding.weight": r(T_MAX, C),
          "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(L):
        p = f"blocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C),
                   p + "attn.c_attn.weight": r(3 * C, C), p + "attn.c_attn.bias": r(3 * C),
                   p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                   p + "attn.bias": torch.tril(torch.ones(T_MAX, T_MAX)).view(1, 1, T_MAX, T_MAX),
                   p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
                   p + "ffn.0.weight": r(4 * C, C), p + "ffn.0.bias": r(4 * C),
                   p + "ffn.2.weight": r(C, 4 * C), p + "ffn.2.bias": r(C)})
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"])


def _lin(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ffn(x, sd, p):
    return _lin(F.gelu(_lin(x, sd, p + "ffn.0")), sd, p + "ffn.2")


def _embed(sd, idx):
    T = idx.shape[1]
    return sd["token_embedding.weight"][idx] + sd["pos_embedding.weight"][:T]


def official_gam_logits(sd, idx):
    """GAM block: x + sigmoid(g_l) * conv(h) + sigmoid(g_g) * softmax(h M^T) M, then FFN."""
    x = _embed(sd, idx)
    T = idx.shape[1]
    for i in range(L):
        p = f"blocks.{i}."
        h = _ln(x, sd, p + "ln1")
        w, b = sd[p + "causal_conv.weight"][:, 0], sd[p + "causal_conv.bias"]  # (C, K)
        padded = torch.cat([h.new_zeros(h.shape[0], K - 1, C), h], dim=1)
        local = sum(padded[:, j:j + T] * w[:, j] for j in range(K)) + b
        m = sd[p + "memory_bank"]
        glob = torch.softmax(h @ m.T, dim=-1) @ m
        g_l, g_g = _lin(h, sd, p + "gate").chunk(2, dim=-1)
        x = x + torch.sigmoid(g_l) * local + torch.sigmoid(g_g) * glob
        x = x + _ffn(_ln(x, sd, p + "ln2"), sd, p)
    return _ln(x, sd, "ln_f") @ sd["head.weight"].T


def official_transformer_logits(sd, idx):
    x = _embed(sd, idx)
    B, T = idx.shape
    for i in range(L):
        p = f"blocks.{i}."
        q, k, v = _lin(_ln(x, sd, p + "ln_1"), sd, p + "attn.c_attn").split(C, dim=-1)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(sd[p + "attn.bias"][:, :, :T, :T] == 0, float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + _lin(y, sd, p + "attn.c_proj")
        x = x + _ffn(_ln(x, sd, p + "ln_2"), sd, p)
    return _ln(x, sd, "ln_f") @ sd["head.weight"].T


CASES = {"gam": (_official_gam_state, official_gam_logits),
         "transformer": (_official_transformer_state, official_transformer_logits)}


@pytest.mark.parametrize("family", sorted(CASES))
def test_official_state_dict_gives_the_official_logits(family):
    make_state, official_logits = CASES[family]
    sd = make_state(torch.Generator().manual_seed(0))
    model = load_official(sd, family, n_heads=H).eval()
    assert model.head.weight is model.token_embedding.weight  # tied, as the official models
    idx = torch.randint(0, V, (3, T_MAX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(ours, official_logits(sd, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(CASES))
def test_official_checkpoint_file_and_sizes(family, tmp_path):
    sd = CASES[family][0](torch.Generator().manual_seed(0))
    path = tmp_path / "official.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, path)  # as saved from DDP
    model = load_official(path, family, n_heads=H, dropout=0.0)
    config = official_config(sd, family)
    assert (config["vocab_size"], config["d_model"], config["n_layers"],
            config["max_seq_len"], config["ffn_mult"]) == (V, C, L, T_MAX, 4)
    if family == "gam":
        assert (config["num_memory_slots"], config["conv_kernel_size"]) == (S, K)
    assert gam.count_parameters(model)["total"] == sum(
        v.numel() for k, v in sd.items() if k != "token_embedding.weight"
        and not k.endswith(".attn.bias"))
    names = convert_official_state_dict(sd, family)
    assert not [k for k in names if ".ffn.0." in k or ".ln_1." in k or "c_attn" in k]


def test_bad_official_inputs_raise_clearly(tmp_path):
    sd = _official_gam_state(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown official family"):
        load_official(sd, "mamba")
    with pytest.raises(ValueError, match="does not exist"):
        load_official(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not an official gam state_dict"):
        load_official({"foo": torch.zeros(1)})
    bad = dict(sd)
    bad["blocks.0.gate.weight"] = torch.zeros(3 * C, C)
    with pytest.raises(ValueError, match="shapes"):
        load_official(bad)
    with pytest.raises(ValueError, match="sets"):
        load_official(sd, init="untied")
    extra = dict(sd, **{"blocks.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        load_official(extra)
