"""Initialisation schemes (``LMConfig.init``, ``tie_embeddings``, ``CausalLM.init_weights``) for
every registered model: the documented distributions, tying, parameter counts, re-initialising
in place, save/load, and ``paper`` bit for bit against the official code's construction order.

Statistics are checked at the tiny preset (d 32) on tensors of >= 500 elements, with a 10%
tolerance on the std: the sampling error is <= 3.2%, and the schemes differ by 2x or more
(paper Linear std 1/sqrt(3 fan_in) ~ 0.1, gpt2 0.02, gpt2 residual 0.01)."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from gam import build_model, count_parameters, load_pretrained, save_pretrained
from gam.models.gam import GAMLM
from gam.models.lm import INIT_SCHEMES
from gam.models.mamba import MambaLM
from gam.models.registry import MODELS, PRESETS
from gam.models.transformer import TransformerLM

NAMES = sorted(MODELS)
TIES = [True, False]
MIN_NUMEL = 500  # std checked only on tensors at least this large
PAPER_COUNTS = {  # docs/usage.md table, paper preset, init="paper", tied
    "gam": 22_599_680, "gam-global-only": 19_435_520, "gam-sum": 19_447_808,
    "gam-local-only": 17_874_944, "transformer": 24_166_400, "transformer-naive": 24_166_400,
    "mamba": 20_510_720, "mamba-paper": 20_504_576, "s4d": 22_462_464, "rwkv7": 22_055_424,
    "transformer-pp": 24_394_240,
}


# "untied" draws every tensor as "paper" does but the untied embedding and the positions
PAPER_LIKE = ("paper", "untied")


def _build(name, init, tie=True, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(name, "tiny", init=init, tie_embeddings=tie, **overrides)


def _close(actual, expected, rel=0.10):
    return abs(actual - expected) <= rel * expected


def _assert_std(t, expected, what):
    std = t.detach().float().std().item()
    assert _close(std, expected), f"{what}: std {std:.4g}, expected {expected:.4g}"


def _family_owned(model):
    """ids of the parameters a block's reset_family_parameters() draws (found on a copy filled
    with 3.0: the ones it changes, zero-initialised ones included), which keep their family
    init in every scheme."""
    twin = copy.deepcopy(model)
    owned = set()
    for block, twin_block in zip(model.blocks, twin.blocks, strict=True):
        if not hasattr(twin_block, "reset_family_parameters"):
            continue
        with torch.no_grad():
            for p in twin_block.parameters():
                p.fill_(3.0)
        torch.manual_seed(12345)
        twin_block.reset_family_parameters()
        for p, new in zip(block.parameters(), twin_block.parameters(), strict=True):
            if not torch.all(new == 3.0):
                owned.add(id(p))
    return owned


def _residual_ids(model):
    return {id(proj.weight) for block in model.blocks
            for proj in getattr(block, "residual_projections", list)()}


def _check_embeddings(model, init, tie):
    c = model.config
    d = c.d_model
    emb, head = model.token_embedding.weight, model.head.weight
    assert (head is emb) == tie
    if init in PAPER_LIKE:
        bound = 1 / math.sqrt(d)  # nn.Linear's U(+-1/sqrt(fan_in)): the tied weight, the head
        assert head.abs().max() <= bound
        _assert_std(head, bound / math.sqrt(3), "head")
        if not tie:
            _assert_std(emb, 1.0, "untied token embedding (nn.Embedding's N(0, 1))")
        pos_std = 1.0 if init == "paper" else 0.02  # untied: positions at the token scale
    else:
        _assert_std(emb, 0.02, "token embedding")
        if not tie:
            _assert_std(head, 0.02, "untied head")
        pos_std = 0.02
    if c.pos_embedding_std is not None:
        pos_std = c.pos_embedding_std
    if model.pos_embedding is not None:
        _assert_std(model.pos_embedding.weight, pos_std, "position embedding")
        assert abs(model.pos_embedding.weight.mean().item()) < 0.1 * pos_std


def _check_blocks(model, init):
    L = model.config.n_layers
    owned, residual = _family_owned(model), _residual_ids(model)
    for bi, block in enumerate(model.blocks):
        for mname, m in block.named_modules():
            where = f"{model.model_name} blocks.{bi}.{mname}"
            if isinstance(m, nn.LayerNorm):
                assert torch.equal(m.weight, torch.ones_like(m.weight)), where
                assert torch.equal(m.bias, torch.zeros_like(m.bias)), where
            if not isinstance(m, nn.Linear):
                continue
            w, b = m.weight, m.bias
            if init == "gpt2" and id(w) in residual:
                _assert_std(w, 0.02 / math.sqrt(2 * L), f"{where} (residual projection)")
                assert b is None or not b.any(), where
                continue
            if id(w) in owned:
                continue  # family init, checked by _check_family
            if init in PAPER_LIKE:
                bound = 1 / math.sqrt(m.in_features)
                assert w.abs().max() <= bound, where
                assert b is None or b.abs().max() <= bound, where
                if w.numel() >= MIN_NUMEL:
                    _assert_std(w, bound / math.sqrt(3), where)
            else:
                if w.numel() >= MIN_NUMEL:
                    _assert_std(w, 0.02, where)
                assert b is None or not b.any(), f"{where}: gpt2 biases are 0"


def _check_family(model, init):
    """The family parameters keep their init in every scheme."""
    c = model.config
    for bi, block in enumerate(model.blocks):
        bank = getattr(block, "memory_bank", None)
        if bank is not None:  # Xavier uniform
            S, C = bank.shape
            assert bank.abs().max() <= math.sqrt(6 / (S + C))
            _assert_std(bank, math.sqrt(2 / (S + C)), f"blocks.{bi}.memory_bank")
        conv = getattr(block, "causal_conv", None)
        if conv is not None:  # nn.Conv1d's default, depthwise: fan_in = kernel size
            assert conv.weight.abs().max() <= 1 / math.sqrt(conv.kernel_size[0])
        mixer = getattr(block, "mixer", None)
        if isinstance(model, MambaLM):
            n, r = c.d_state, c.dt_rank_value
            A_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(c.d_inner, 1)
            assert torch.equal(mixer.A_log, A_log)
            assert torch.equal(mixer.D, torch.ones_like(mixer.D))
            assert mixer.dt_proj.weight.abs().max() <= r ** -0.5
            dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
            assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
            if init in PAPER_LIKE and block.residual:  # U(+-1/sqrt(E)) / sqrt(L)
                w = mixer.out_proj.weight
                expected = 1 / math.sqrt(c.d_inner) / math.sqrt(c.n_layers)
                assert w.abs().max() <= expected * 1.0001
                _assert_std(w, expected / math.sqrt(3), "mamba out_proj")


def _check_scheme(model, init, tie):
    _check_embeddings(model, init, tie)
    _check_blocks(model, init)
    _check_family(model, init)


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("init", INIT_SCHEMES)
@pytest.mark.parametrize("name", NAMES)
def test_construction_gives_the_documented_distributions(name, init, tie):
    model = _build(name, init, tie)
    assert model.config.init == init and model.config.tie_embeddings is tie
    _check_scheme(model, init, tie)


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("init", INIT_SCHEMES)
@pytest.mark.parametrize("name", NAMES)
def test_init_weights_restores_every_parameter_in_place(name, init, tie):
    model = _build(name, init, tie)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    torch.manual_seed(1)
    model.init_weights()
    assert dict(model.named_parameters()) == params  # same Parameter objects (optimizers)
    for pname, p in model.named_parameters():
        assert not torch.all(p == 3.0), f"{name}: init_weights() left {pname} untouched"
    _check_scheme(model, init, tie)


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("init", INIT_SCHEMES)
@pytest.mark.parametrize("name", NAMES)
def test_init_module_weights_redraws_one_module_and_nothing_else(name, init, tie):
    model = _build(name, init, tie)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    torch.manual_seed(1)
    for module in model.modules():
        own = {id(p) for p in module.parameters(recurse=False)}
        if not own:
            continue
        before = {pname: p.detach().clone() for pname, p in model.named_parameters()}
        model.init_module_weights(module)
        for pname, p in model.named_parameters():
            if id(p) in own:
                assert not torch.all(p == 3.0), f"{name}: {pname} was not re-drawn"
            else:
                assert torch.equal(p, before[pname]), f"{name}: {pname} changed"
    _check_scheme(model, init, tie)  # one module at a time gives init_weights' distributions
    with pytest.raises(ValueError, match="not a module of this model"):
        model.init_module_weights(torch.nn.Linear(2, 2))


def test_pos_embedding_std_overrides_every_scheme():
    for init in INIT_SCHEMES:
        model = _build("gam", init, max_seq_len=256, pos_embedding_std=0.5)
        _assert_std(model.pos_embedding.weight, 0.5, init)
        model.init_weights()
        _assert_std(model.pos_embedding.weight, 0.5, init)


def _official_construction(model):
    """The parameters today's (pre-``init``) code draws for ``model``'s config under
    torch.manual_seed(0), written out module by module in its construction order, and the RNG
    state after it."""
    c = model.config
    d = c.d_model
    torch.manual_seed(0)
    out = {}

    def ln(prefix):
        out[prefix + ".weight"], out[prefix + ".bias"] = torch.ones(d), torch.zeros(d)

    def linear(prefix, fan_in, fan_out, bias=True):
        m = nn.Linear(fan_in, fan_out, bias=bias)
        out[prefix + ".weight"] = m.weight
        if bias:
            out[prefix + ".bias"] = m.bias
        return m

    def conv(prefix, channels, k, bias=True):
        m = nn.Conv1d(channels, channels, k, groups=channels, bias=bias)
        out[prefix + ".weight"], out[prefix + ".bias"] = m.weight, m.bias

    head = linear("head", d, c.vocab_size, bias=False)
    nn.Embedding(c.vocab_size, d)  # its draw is discarded: the embedding takes the head's weight
    out["token_embedding.weight"] = head.weight
    if c.pos_embedding:
        pos = nn.Embedding(c.max_seq_len, d)
        if c.pos_embedding_std is not None:
            nn.init.normal_(pos.weight, std=c.pos_embedding_std)
        out["pos_embedding.weight"] = pos.weight
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        if isinstance(model, GAMLM):
            ln(p + "ln1")
            if c.use_local:
                conv(p + "causal_conv", d, c.conv_kernel_size)
            if c.use_global:
                out[p + "memory_bank"] = nn.init.xavier_uniform_(
                    torch.empty(c.num_memory_slots, d))
            if c.use_gate:
                linear(p + "gate", d, (int(c.use_local) + int(c.use_global)) * d)
        elif isinstance(model, TransformerLM):
            ln(p + "ln1")
            linear(p + "attn.qkv", d, 3 * d)
            linear(p + "attn.proj", d, d)
        else:
            residual = c.stacking == "residual"
            if residual:
                ln(p + "norm")
            e, r, n, m = c.d_inner, c.dt_rank_value, c.d_state, p + "mixer."
            linear(m + "in_proj", d, 2 * e, bias=False)
            conv(m + "conv1d", e, c.d_conv)
            linear(m + "x_proj", e, r + 2 * n, bias=False)
            dt_proj = linear(m + "dt_proj", r, e)
            nn.init.uniform_(dt_proj.weight, -r ** -0.5, r ** -0.5)
            dt = torch.exp(torch.rand(e) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            out[m + "dt_proj.bias"] = dt + torch.log(-torch.expm1(-dt))
            out[m + "A_log"] = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)
            out[m + "D"] = torch.ones(e)
            w = linear(m + "out_proj", e, d, bias=False).weight
            if residual:
                out[m + "out_proj.weight"] = w / math.sqrt(c.n_layers)
            continue  # no FFN in a Mamba block
        ln(p + "ln2")
        linear(p + "ffn.fc1", d, c.ffn_mult * d)
        linear(p + "ffn.fc2", c.ffn_mult * d, d)
    ln("ln_f")
    return out, torch.get_rng_state()


# the families that existed before the init setting, whose construction it must keep
OFFICIAL_NAMES = [n for n in NAMES if MODELS[n].model_cls in (GAMLM, TransformerLM, MambaLM)]


@pytest.mark.parametrize("overrides", [{}, {"pos_embedding_std": 0.02}])
@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_paper_init_is_the_official_construction_bit_for_bit(name, overrides):
    torch.manual_seed(0)
    model = build_model(name, "tiny", init="paper", **overrides)
    rng_after = torch.get_rng_state()
    expected, expected_rng = _official_construction(model)
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key].detach()), f"{name}: {key} differs"
    assert torch.equal(rng_after, expected_rng)  # no extra draws: later RNG use is unchanged


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    with torch.device("meta"):
        paper = count_parameters(build_model(name, "paper", init="paper"))
        untied = count_parameters(build_model(name, "paper", init="paper", tie_embeddings=False))
        gpt2 = count_parameters(build_model(name, "paper", init="gpt2"))
    if name in PAPER_COUNTS:
        assert paper["total"] == PAPER_COUNTS[name]
    vd = PRESETS["paper"]["vocab_size"] * PRESETS["paper"]["d_model"]
    assert gpt2 == paper
    assert untied["total"] - paper["total"] == vd
    # an untied head is an output layer: counted as non-embedding (nanoGPT's convention)
    assert untied["non_embedding"] - paper["non_embedding"] == vd


@pytest.mark.parametrize("name", ["gam", "transformer", "mamba"])
@pytest.mark.parametrize("init", INIT_SCHEMES)
def test_untied_and_tied_models_save_and_reload_exactly(tmp_path, name, init):
    for tie in TIES:
        model = _build(name, init, tie).eval()
        out = tmp_path / f"{init}-{tie}"
        save_pretrained(model, out)
        meta = json.loads((out / "model.json").read_text())
        assert meta["config"]["init"] == init and meta["config"]["tie_embeddings"] is tie
        loaded = load_pretrained(out).eval()
        assert loaded.config == model.config
        assert (loaded.head.weight is loaded.token_embedding.weight) == tie
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        idx = torch.randint(0, model.config.vocab_size, (2, 16))
        assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_config_saved_before_the_init_setting_loads_as_paper_and_tied(tmp_path):
    model = _build("gam-sum", "paper").eval()
    save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["config"]["init"], meta["config"]["tie_embeddings"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded = load_pretrained(tmp_path)
    assert loaded.config.init == "paper" and loaded.config.tie_embeddings is True
    assert loaded.head.weight is loaded.token_embedding.weight
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_bad_settings_raise_a_value_error_naming_them():
    with pytest.raises(ValueError, match=r"init must be one of .*'xavier'"):
        build_model("gam", "tiny", init="xavier")
    with pytest.raises(ValueError, match="tie_embeddings"):
        build_model("gam", "tiny", tie_embeddings="no")
    model = build_model("transformer", "tiny")
    model.config.init = "gpt3"
    with pytest.raises(ValueError, match=r"init must be one of .*'gpt3'"):
        model.init_weights()
