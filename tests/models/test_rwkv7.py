"""RWKV-7: chunked path against the recurrence, the value residual, cached decoding, causality,
paper size, init."""

import math

import pytest
import torch

from gam import build_model, count_parameters, load_pretrained, save_pretrained
from gam.models.registry import model_config
from gam.models.rwkv7 import RWKV7LM, RWKV7Block, RWKV7Config, RWKV7State, paper_lora_rank

# tiny tensors: one thread (the shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturb(module, scale=0.1):
    with torch.no_grad():  # zero-initialised projections: make every parameter matter
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _model(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return _perturb(build_model("rwkv7", "tiny", **overrides)).to(dtype).eval()


def _small_config(**overrides):
    return RWKV7Config(**{**dict(vocab_size=50, max_seq_len=64, d_model=24, n_layers=3,
                                 n_heads=3, dropout=0.0, chunk_size=8, decay_lora=4,
                                 rate_lora=4, value_lora=4, gate_lora=6), **overrides})


@pytest.mark.parametrize("T", [1, 21])
def test_model_forward_matches_recurrence_values_and_gradients_float64(T, assert_same_gradients):
    # chunk 8, T = 21: a ragged last chunk; 3 layers, so v_first reaches two of them
    torch.manual_seed(0)
    model = _perturb(RWKV7LM(_small_config())).double()
    idx = torch.randint(0, 50, (2, T))
    logits, _ = model(idx)
    reference = model.forward_reference(idx)
    torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-10)
    assert_same_gradients([logits], [reference], list(model.parameters()), rtol=1e-9,
                          atol=1e-9)
    assert all(p.requires_grad for p in model.parameters())


def test_first_layer_values_reach_the_later_layers():
    torch.manual_seed(0)
    model = _perturb(RWKV7LM(_small_config())).double()
    assert model.blocks[0].att.v0 is None and model.blocks[1].att.v0 is not None
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    _, v_first, _ = model.blocks[0].run(x, None, None)
    torch.testing.assert_close(v_first, model.blocks[0].att.value(
        torch.addcmul(h := model.blocks[0].ln1(model.blocks[0].ln0(x)),
                      torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1) - h,
                      model.blocks[0].att.x_v)))
    # a later block mixes v_first in: with other first-layer values its output changes ...
    y, _, _ = model.blocks[1].run(x, v_first, None)
    y_other, _, _ = model.blocks[1].run(x, v_first + 1.0, None)
    assert not torch.allclose(y, y_other)
    # ... and alone (no v_first) it uses its own values, the mix being the identity
    y_alone = model.blocks[1](x)
    block = model.blocks[1]
    with torch.no_grad():
        block.att.v0.fill_(-1e4)  # sigmoid -> 0: v_first's weight vanishes
    torch.testing.assert_close(block.run(x, v_first, None)[0], y_alone)
    # the whole model: the value-residual LoRA gets gradient through v_first
    idx = torch.randint(0, 50, (2, 9))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.blocks[2].att.v2.grad.abs().sum() > 0


@pytest.mark.parametrize("prompt_len", [1, 9, 63])
def test_cached_decoding_equals_full_forward_float64(prompt_len):
    model = _model(torch.float64)
    T = model.config.max_seq_len  # 64: two chunks of 32
    idx = torch.randint(0, model.config.vocab_size, (2, T))
    full, _ = model(idx)
    logits, cache = model.prefill(idx[:, :prompt_len])
    torch.testing.assert_close(logits, full[:, prompt_len - 1], rtol=1e-10, atol=1e-10)
    for t in range(prompt_len, T):
        logits, cache = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-10, atol=1e-10)
    state = cache.layers[0]
    assert isinstance(state, RWKV7State)
    c = model.config
    assert state.wkv.shape == (2, c.n_heads, c.head_size, c.head_size)
    assert state.att_shift.shape == state.ffn_shift.shape == (2, c.d_model)


def test_decode_state_does_not_grow_with_the_context():
    model = _model()
    _, short = model.prefill(torch.randint(0, 256, (1, 3)))
    _, long = model.prefill(torch.randint(0, 256, (1, 60)))
    for a, b in zip(short.layers, long.layers, strict=True):
        assert all(x.shape == y.shape for x, y in zip(a, b, strict=True))


def test_recurrent_impl_equals_chunked():
    chunked = _model(chunk_size=8)
    recurrent = build_model("rwkv7", "tiny", rwkv7_impl="recurrent").eval()
    recurrent.load_state_dict(chunked.state_dict())
    idx = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(chunked(idx)[0], recurrent(idx)[0], rtol=1e-5, atol=1e-5)


def test_paper_size_parameter_count_within_five_percent_of_gam():
    with torch.device("meta"):
        counts = {n: count_parameters(build_model(n, "paper", init="paper"))["total"]
                  for n in ("gam", "rwkv7")}
    assert counts["gam"] == 22_599_680
    assert counts["rwkv7"] == 22_055_424
    assert abs(counts["rwkv7"] - counts["gam"]) / counts["gam"] < 0.05
    c = model_config("rwkv7", "paper")
    assert (c.head_size, c.n_heads, c.ffn_mult, c.pos_embedding) == (64, 8, 3, False)
    assert c.lora_ranks() == {"decay_lora": 32, "rate_lora": 32, "value_lora": 32,
                              "gate_lora": 96}
    # the paper's rule gives the 0.1B model's (d 768) ranks
    assert [paper_lora_rank(768, f, p) for f, p in ((1.8, .5), (1.3, .5), (0.6, .8))] == \
        [64, 32, 128]
    # the count, written out: per block 4 d^2 (r, k, v, o), 2 * 3 d^2 (channel mix), LoRAs
    # (value residual from block 1 on), 6 + 3 + 1 token-shift / bias vectors of d, r_k,
    # GroupNorm and two LayerNorms; ln0 once, the tied embedding, the final norm
    d, L, V = 512, 6, 10_000
    block = 4 * d * d + 6 * d * d + 2 * d * (32 + 32 + 96) + 6 * d + 2 * d + 3 * d + d + 6 * d
    expected = L * block + (L - 1) * (2 * d * 32 + d) + V * d + 2 * d + 2 * d
    assert counts["rwkv7"] == expected


def test_paper_init_values():
    model = build_model("rwkv7", "tiny", init="paper", n_layers=3)
    c = model.config
    d, N = c.d_model, c.head_size
    for layer, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        assert not att.output.weight.any() and not ffn.value.weight.any()  # blocks start as I
        assert att.receptance.weight.abs().max() <= 0.5 / math.sqrt(d)
        assert att.key.weight.abs().max() <= 0.05 / math.sqrt(d)
        assert not att.w1.any() and not att.a1.any() and not att.g1.any()
        assert torch.allclose(att.w2 @ att.w2.T, 0.01 * torch.eye(att.w2.shape[0]), atol=1e-5)
        i = torch.arange(d, dtype=torch.float64)
        expected = 1 - (i / d) ** (0.2 * (1 - layer / c.n_layers))
        torch.testing.assert_close(att.x_r.double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.all(att.k_a == 1.02) and torch.all(att.r_k == -0.04)
        # the initial decays: within RWKV-7's (exp(-e^-1/2), 1) and spread over the channels
        log_w = -math.exp(-0.5) * torch.sigmoid(att.w0)
        assert log_w.min() > -0.61 and log_w.max() < 0 and log_w.max() - log_w.min() > 0.3
        assert (block.ln0 is not None) == (layer == 0)
    assert model.pos_embedding is None
    # the family init holds in every scheme (gpt2 only re-draws the residual projections)
    gpt2 = build_model("rwkv7", "tiny", init="gpt2")
    assert gpt2.blocks[0].att.key.weight.abs().max() <= 0.05 / math.sqrt(d)
    assert gpt2.blocks[0].att.output.weight.std() > 0
    assert N == d // c.n_heads


def test_bf16_autocast_tracks_float32():
    model = _model(chunk_size=8)
    idx = torch.randint(0, 256, (2, 40))
    _, loss32 = model(idx[:, :-1], idx[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(idx[:, :-1], idx[:, 1:], return_logits=False)
        _, cache = model.prefill(idx[:, :5])
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    assert cache.layers[0].wkv.dtype == torch.float32  # the state stays float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_block_alone_runs_for_the_benchmarks():
    block = RWKV7Block(_small_config(), 0)
    x = torch.randn(2, 11, 24, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and block.att.receptance.weight.grad is not None


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.model_name == "rwkv7" and isinstance(loaded, RWKV7LM)
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_heads=5), "d_model 32 is not divisible by n_heads 5"),
    (dict(n_heads=0), "n_heads must be an integer >= 1, got 0"),
    (dict(chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
    (dict(gate_lora=0), r"gate_lora must be an integer >= 1 or None \(the paper's rule\), got 0"),
    (dict(rwkv7_impl="fast"), "rwkv7_impl must be one of .* got 'fast'"),
])
def test_bad_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_config("rwkv7", "tiny", **kwargs)


def test_cli_trains_evaluates_and_generates(tmp_path, private_gam_environment, capsys):
    from gam.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["the", "goose", "flies", "over", "a", "lake", "and", "sees", "its", "state"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    (corpus / "train.txt").write_text("\n".join(lines[:260]) + "\n")
    (corpus / "valid.txt").write_text("\n".join(lines[260:]) + "\n")
    run = tmp_path / "run"
    with private_gam_environment(tmp_path / "cache"):
        assert main(["train", "--model", "rwkv7", "--preset", "tiny", "--dataset",
                     f"text:{corpus}", "--vocab-size", "300", "--batch-size", "4", "--quiet",
                     "--threads", "1", "--device", "cpu", "--max-steps", "3", "--out",
                     str(run)]) == 0
        assert main(["eval", str(run)]) == 0
        assert main(["generate", str(run), "--prompt", "the goose", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert '"model": "rwkv7"' in out and "the goose" in out
