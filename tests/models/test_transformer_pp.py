"""Transformer++ (the Llama recipe): the block against an explicit reference, cached decoding,
causality, the SwiGLU FFN, no biases, the parameter count, and the end-to-end commands."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gam import build_model, count_parameters, load_pretrained, save_pretrained
from gam.cli import main as cli_main
from gam.models.blocks import SwiGLU, block_decode_state_bytes
from gam.models.ops.rotary import apply_rotary_reference
from gam.models.registry import model_config
from gam.models.transformer_pp import (
    TransformerPPBlock,
    TransformerPPConfig,
    TransformerPPLM,
    swiglu_hidden_size,
)

NAME = "transformer-pp"
TRANSFORMER_PAPER_COUNT = 24_166_400  # the paper Transformer (docs/usage.md table)
PAPER_COUNT = 24_394_240  # SwiGLU width 1408

# tiny tensors: one thread (the shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturb(module):
    with torch.no_grad():  # RMSNorm weights start at one: make every parameter matter
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def _model(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return _perturb(build_model(NAME, "tiny", **overrides)).to(dtype).eval()


def _block_reference(block, x):
    """The block from its equations: explicit rotation matrices, RMS norms and a masked
    softmax, float64."""
    def rms(h, norm):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    B, T, C = x.shape
    H = block.attn.n_heads
    pos = torch.arange(T)
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2)
               for t in (rms(x, block.norm1) @ block.attn.qkv.weight.T).split(C, -1))
    q = apply_rotary_reference(q, pos, block.attn.rotary_base)
    k = apply_rotary_reference(k, pos, block.attn.rotary_base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // H)  # (B, H, T, T)
    scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    x = x + a @ block.attn.proj.weight.T
    h = rms(x, block.norm2)
    ffn = block.ffn
    return x + (F.silu(h @ ffn.w1.weight.T) * (h @ ffn.w3.weight.T)) @ ffn.w2.weight.T


@pytest.mark.parametrize("T", [1, 13])
def test_block_matches_its_equations_values_and_gradients(T):
    torch.manual_seed(0)
    cfg = TransformerPPConfig(vocab_size=50, max_seq_len=32, d_model=24, n_layers=1,
                              n_heads=3, dropout=0.0)
    block = _perturb(TransformerPPBlock(cfg).double())
    x = torch.randn(2, T, 24, dtype=torch.float64, requires_grad=True)
    params = [x, *block.parameters()]
    y = block(x)
    g_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g_out)
    y_ref = _block_reference(block, x)
    grads_ref = torch.autograd.grad(y_ref, params, g_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prompt_len", [1, 9, 63])
def test_cached_decoding_equals_full_forward(prompt_len):
    model = _model(torch.float64)
    T = model.config.max_seq_len  # 64
    idx = torch.randint(0, model.config.vocab_size, (2, T))
    full, _ = model(idx)  # (B, T, V)
    logits, cache = model.prefill(idx[:, :prompt_len])
    torch.testing.assert_close(logits, full[:, prompt_len - 1], rtol=1e-10, atol=1e-10)
    for t in range(prompt_len, T):
        assert all(layer["len"] == t for layer in cache.layers)  # the next rotary position
        logits, cache = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-10, atol=1e-10)
    assert cache.seq_len == T


def test_step_rotates_at_the_cache_position():
    """A step at a wrong position would change the logits: the cache's position matters."""
    model = _model(torch.float64)
    idx = torch.randint(0, 256, (1, 12))
    full, _ = model(idx)
    _, cache = model.prefill(idx[:, :11])
    for layer in cache.layers:
        layer["len"] -= 1  # overwrite the last key at the previous position
    wrong, _ = model.step(idx[:, 11], cache)
    assert not torch.allclose(wrong, full[:, 11], atol=1e-6)


def test_greedy_cached_generation_equals_uncached():
    model = _model()
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 20, temperature=0)
    seq = prompt
    for _ in range(20):  # no cache: a full forward per token
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_recipe_structure_no_biases_no_positions_rmsnorm():
    model = build_model(NAME, "tiny")
    assert isinstance(model, TransformerPPLM)
    assert model.pos_embedding is None and isinstance(model.ln_f, nn.RMSNorm)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    block = model.blocks[0]
    assert isinstance(block.norm1, nn.RMSNorm) and isinstance(block.norm2, nn.RMSNorm)
    assert block.residual_projections() == [block.attn.proj, block.ffn.w2]


def test_swiglu_shapes_and_equation():
    torch.manual_seed(0)
    ffn = SwiGLU(24, 40, dropout=0.0).double()
    assert ffn.w1.weight.shape == ffn.w3.weight.shape == (40, 24)
    assert ffn.w2.weight.shape == (24, 40)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    expected = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight),
                        ffn.w2.weight)
    torch.testing.assert_close(ffn(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(ffn(x, x), x + expected, rtol=0, atol=0)


def test_swiglu_width_is_llamas_rule_at_each_preset_and_can_be_set():
    # 2/3 of 4d rounded up to a multiple of 64
    assert swiglu_hidden_size(512, 4) == 1408 and swiglu_hidden_size(256, 4) == 704
    assert swiglu_hidden_size(32, 4) == 128
    for preset, width in [("paper", 1408), ("cpu-small", 704), ("tiny", 128)]:
        assert model_config(NAME, preset).ffn_hidden_size == width
    assert build_model(NAME, "tiny", ffn_hidden=48).blocks[0].ffn.w1.out_features == 48


def test_paper_size_parameter_count_within_3_percent_of_the_transformer():
    with torch.device("meta"):
        total = count_parameters(build_model(NAME, "paper", init="paper"))["total"]
        transformer = count_parameters(build_model("transformer", "paper",
                                                   init="paper"))["total"]
    assert transformer == TRANSFORMER_PAPER_COUNT
    assert total == PAPER_COUNT
    assert abs(total - TRANSFORMER_PAPER_COUNT) / TRANSFORMER_PAPER_COUNT < 0.03
    d, L, V, hidden = 512, 6, 10000, 1408
    block = 2 * d + 3 * d * d + d * d + 3 * d * hidden  # 2 norms, qkv, proj, w1 w3 w2
    assert total == V * d + L * block + d  # tied embedding, blocks, final norm


@pytest.mark.parametrize("init", ["paper", "gpt2"])
def test_init_schemes(init):
    torch.manual_seed(0)
    model = build_model(NAME, "cpu-small", init=init)
    L = model.config.n_layers
    for block in model.blocks:
        assert torch.equal(block.norm1.weight, torch.ones(256))
        w1, proj = block.ffn.w1.weight, block.attn.proj.weight
        if init == "paper":  # nn.Linear's U(+-1/sqrt(fan_in))
            assert w1.abs().max() <= 1 / math.sqrt(256)
            assert math.isclose(w1.std().item(), 1 / math.sqrt(3 * 256), rel_tol=0.05)
        else:
            assert math.isclose(w1.std().item(), 0.02, rel_tol=0.05)
            assert math.isclose(proj.std().item(), 0.02 / math.sqrt(2 * L), rel_tol=0.05)


def test_decode_state_is_the_filled_kv_cache():
    model = _model()
    _, cache = model.prefill(torch.randint(0, 256, (2, 7)))
    layer = cache.layers[0]
    H, hd = model.config.n_heads, model.config.d_model // model.config.n_heads
    assert layer["k"].shape == layer["v"].shape == (2, H, 64, hd)
    assert block_decode_state_bytes(model.blocks[0], layer) == 2 * (2 * H * 7 * hd) * 4


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.model_name == NAME and isinstance(loaded, TransformerPPLM)
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_bf16_autocast_decoding_tracks_the_forward():
    model = _model()
    idx = torch.randint(0, 256, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx)[0].float()
        _, cache = model.prefill(idx[:, :7])
        stepped = torch.stack([model.step(idx[:, t], cache)[0].float() for t in range(7, 12)], 1)
    assert cache.layers[0]["k"].dtype == torch.bfloat16  # rotated in float32, stored in bf16
    assert (stepped - full[:, 7:]).abs().max() < 0.1


BAD_SETTINGS = {  # setting -> the one-line error it must give
    "n_heads=0": (dict(n_heads=0), "n_heads must be a positive integer, got 0"),
    "n_heads=5": (dict(n_heads=5), "d_model 32 is not divisible by n_heads 5"),
    "odd head": (dict(n_heads=32), "even head dimension; d_model 32 / n_heads 32 = 1"),
    "ffn_hidden=0": (dict(ffn_hidden=0), "ffn_hidden must be a positive integer or None"),
    "rotary_base=1": (dict(rotary_base=1), "rotary_base must be a number > 1, got 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_settings_are_one_line_errors(case):
    kwargs, match = BAD_SETTINGS[case]
    with pytest.raises(ValueError, match=match):
        build_model(NAME, "tiny", **kwargs)


def test_train_eval_generate_and_the_model_benchmarks_through_the_cli(
        tmp_path, private_gam_environment, monkeypatch, capsys):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    words = "the cat sat on a mat and dog ran to red blue house".split()
    rng = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (10,), generator=rng))
             for _ in range(400)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" .\n".join(lines) + "\n")
    run, bench = tmp_path / "run", tmp_path / "bench"
    common = ["--threads", "1", "--device", "cpu"]
    with private_gam_environment(tmp_path / "cache"):
        assert cli_main(["train", "--model", NAME, "--preset", "tiny", "--dataset",
                         f"text:{corpus}", "--batch-size", "4", "--max-steps", "2", "--quiet",
                         "--out", str(run), *common]) == 0
        assert json.loads((run / "config.json").read_text())["model"] == NAME
        assert cli_main(["eval", str(run)]) == 0
        assert cli_main(["generate", str(run), "--prompt", "the cat", "--max-new-tokens",
                         "3"]) == 0
        assert cli_main(["bench", "decode", "--preset", "tiny", "--models", NAME, "--contexts",
                         "8", "--new-tokens", "2", "--out", str(bench / "decode"),
                         *common]) == 0
        assert cli_main(["bench", "recall", "--quick", "--in-process", "--models", NAME,
                         "--lrs", "3e-3", "--steps", "2", "--out", str(bench / "recall"),
                         *common]) == 0
    assert "Traceback" not in capsys.readouterr().err
    for sub in ("decode", "recall"):
        results = json.loads((bench / sub / "results.json").read_text())
        assert NAME in json.dumps(results["settings"])
