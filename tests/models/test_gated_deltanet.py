"""Gated DeltaNet: fast path against the reference, cached decoding, sizes, init, training."""

import math

import pytest
import torch

from gam import build_model, count_parameters, load_pretrained, receptive_field, save_pretrained
from gam.models.blocks import SwiGLU
from gam.models.gated_deltanet import (
    GatedDeltaNetBlock,
    GatedDeltaNetConfig,
    GatedDeltaNetLM,
    GatedDeltaNetState,
)
from gam.models.ops.delta_memory import gated_log_decay
from gam.models.registry import model_config

NAMES = ["gated-deltanet", "gated-deltanet-matched"]

# tiny tensors: one thread (the shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def make_block(perturb):
    """A float64 block at d 48 with 3 heads (d_k 12, d_v 24) and chunk 8, perturbed."""
    def make(**overrides):
        torch.manual_seed(0)
        cfg = GatedDeltaNetConfig(vocab_size=50, max_seq_len=64, d_model=48, n_layers=2,
                                  dropout=0.0, delta_heads=3, delta_chunk_size=8, **overrides)
        return perturb(GatedDeltaNetBlock(cfg).double())
    return make


@pytest.fixture
def make_model(perturb):
    """A perturbed tiny-preset model in eval mode."""
    def make(name, **overrides):
        torch.manual_seed(0)
        return perturb(build_model(name, "tiny", **overrides)).eval()
    return make


@pytest.mark.parametrize("T", [1, 21])
@pytest.mark.parametrize("overrides", [{}, dict(expand_v=1, delta_head_dim=10)])
def test_block_forward_matches_reference_values_and_gradients(
        T, overrides, check_fast_path_matches_reference, make_block):
    # the chunked rule and the compiled conv against the recurrent rule and PyTorch's conv
    block = make_block(**overrides)
    check_fast_path_matches_reference(block, torch.randn(2, T, 48, dtype=torch.float64,
                                                         requires_grad=True))


def test_block_extend_in_pieces_then_steps_equals_forward(make_block):
    block = make_block()  # d 48, 3 heads: d_k 12, d_v 24
    x = torch.randn(2, 21, 48, dtype=torch.float64)
    full = block(x)
    out, state = block.prefill(x[:, :5])
    assert isinstance(state, GatedDeltaNetState)
    assert state.qkv.shape == (2, 3, 3 * (2 * 12 + 24)) and state.memory.shape == (2, 3, 12, 24)
    y, state = block.extend(x[:, 5:14], state)  # 9 tokens: one full chunk and one partial
    out = torch.cat([out, y], 1)
    while out.shape[1] < 21:  # then one token at a time
        y, state = block.step(x[:, out.shape[1]], state)
        out = torch.cat([out, y[:, None]], 1)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prompt_len", [1, 9, 63])
def test_cached_decoding_equals_full_forward(name, prompt_len, check_cached_decoding, make_model):
    model = make_model(name, delta_chunk_size=16).double()  # several chunks, ragged prompts
    check_cached_decoding(model, prompt_len, dict(rtol=1e-9, atol=1e-9))


@pytest.mark.parametrize("name", NAMES)
def test_greedy_cached_generation_equals_uncached(name, make_model):
    model = make_model(name, delta_chunk_size=8)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, max_new_tokens=20, temperature=0)
    idx = prompt
    for _ in range(20):  # uncached: the whole sequence each time
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


def test_bf16_cached_decoding_runs_with_float32_state(make_model, check_bf16_cached_decoding):
    check_bf16_cached_decoding(make_model("gated-deltanet"))


@pytest.mark.parametrize("name", NAMES)
def test_causal_and_sees_the_whole_context(name, logit_dependence, make_model,
                                           check_future_token_leaves_past_unchanged):
    model = make_model(name)
    check_future_token_leaves_past_unchanged(model)
    assert receptive_field(model) == receptive_field(model.config) == 64
    dep = logit_dependence(model, 20)  # every position sees all before it, none after
    assert torch.equal(dep, torch.ones(20, 20, dtype=torch.bool).tril())


def test_paper_size_parameter_counts():
    with torch.device("meta"):
        counts = {n: count_parameters(build_model(n, "paper", init="paper"))["total"]
                  for n in ["gam", "gam-delta", *NAMES]}
    assert counts["gated-deltanet"] == 30_563_656
    assert counts["gated-deltanet-matched"] == 22_601_032
    assert abs(counts["gated-deltanet"] / counts["gam-delta"] - 1) < 0.03
    assert abs(counts["gated-deltanet-matched"] / counts["gam"] - 1) < 0.03
    # one block: q, k (6 x 64 each), v and the output gate (6 x 128 each), the convs, beta,
    # decay (proj, A_log, dt_bias), per-head norm, o_proj, two RMSNorms, SwiGLU (3 d m)
    d, L, H, dk, dv, V = 512, 6, 6, 64, 128, 10000
    mixer = (2 * H * dk + 2 * H * dv) * d + (2 * H * dk + H * dv) * 4 + 2 * d * H + 2 * H + dv \
        + H * dv * d
    for name, width in (("gated-deltanet", 1728), ("gated-deltanet-matched", 864)):
        assert counts[name] == V * d + d + L * (mixer + 2 * d + 3 * d * width)  # tied, no pos


def test_configuration_at_the_presets():
    c = model_config("gated-deltanet", "paper")
    assert (c.delta_heads, c.head_dim_value, c.expand_v, c.mlp_hidden) == (6, 64, 2, 1728)
    assert model_config("gated-deltanet-matched", "paper").mlp_hidden == 864
    assert (c.pos_embedding, c.final_norm, c.delta_conv_size) == (False, "rmsnorm", 4)
    assert model_config("gated-deltanet", "cpu-small").head_dim_value == 32
    assert model_config("gated-deltanet", "tiny").head_dim_value == 4
    model = build_model("gated-deltanet", "tiny")
    assert isinstance(model, GatedDeltaNetLM) and model.pos_embedding is None
    assert isinstance(model.ln_f, torch.nn.RMSNorm)
    block = model.blocks[0]
    assert isinstance(block.mlp, SwiGLU) and isinstance(block.norm1, torch.nn.RMSNorm)
    assert block.mixer.g_proj is not None and block.mixer.qkv_conv.bias is None


@pytest.mark.parametrize("init", ["paper", "gpt2", "untied"])
def test_decay_init_and_range(init):
    torch.manual_seed(0)
    model = build_model("gated-deltanet", "cpu-small", init=init)
    model.init_weights()
    for block in model.blocks:
        A = torch.exp(block.mixer.A_log.detach())
        dt = torch.nn.functional.softplus(block.mixer.dt_bias.detach())
        assert ((A >= 1) & (A <= 16)).all()
        assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()
    assert model.blocks[0].mixer.no_weight_decay_names == ("A_log", "dt_bias")
    mixer = model.blocks[0].mixer
    g = gated_log_decay(mixer.a_proj(10 * torch.randn(3, 7, 256)), mixer.A_log, mixer.dt_bias)
    assert (g <= 0).all()
    if init == "gpt2":  # the residual projections are scaled down
        std = 0.02 / math.sqrt(2 * model.config.n_layers)
        assert abs(mixer.o_proj.weight.std().item() - std) < 0.2 * std
        assert abs(model.blocks[0].mlp.w2.weight.std().item() - std) < 0.2 * std


@pytest.mark.parametrize("kwargs, match", [
    (dict(delta_heads=0), "delta_heads must be an integer >= 1, got 0"),
    (dict(delta_heads=5), "3/4 of d_model 32 is not divisible by delta_heads 5"),
    (dict(delta_head_dim=0), "delta_head_dim must be an integer >= 1 or None, got 0"),
    (dict(expand_v=0), "expand_v must be an integer >= 1, got 0"),
    (dict(delta_impl="fast"), "delta_impl must be one of .* got 'fast'"),
    (dict(mlp_ratio=0.0), "mlp_ratio must be a number .* got 0.0"),
    (dict(ffn_mult=2), "sizes its MLP with mlp_ratio, not ffn_mult"),
])
def test_bad_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_config("gated-deltanet", "tiny", **kwargs)


def test_save_load_round_trip_and_the_recurrent_impl_give_the_same_logits(tmp_path,
                                                                          make_model):
    model = make_model("gated-deltanet-matched", delta_chunk_size=8)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.model_name == "gated-deltanet-matched" and isinstance(loaded, GatedDeltaNetLM)
    recurrent = build_model("gated-deltanet-matched", "tiny", delta_impl="recurrent").eval()
    recurrent.load_state_dict(model.state_dict())
    idx = torch.randint(0, 256, (2, 30))
    logits = model(idx)[0]
    assert torch.equal(logits, loaded(idx)[0])
    torch.testing.assert_close(recurrent(idx)[0], logits, rtol=1e-5, atol=1e-5)


def test_bf16_training_step_has_finite_loss_and_gradients():
    model = build_model("gated-deltanet-matched", "tiny")
    idx = torch.randint(0, 256, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_train_eval_generate_and_bench_through_the_cli(tmp_path, data_dir):
    from gam.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "gated-deltanet-matched", "--preset", "tiny",
                 "--dataset", "wikitext2", "--data-dir", str(data_dir), "--max-train-rows", "100",
                 "--max-val-rows", "20", "--vocab-size", "300", "--batch-size", "4",
                 "--max-steps", "2", "--quiet", "--threads", "1", "--out", str(run)]) == 0
    assert main(["eval", str(run), "--data-dir", str(data_dir), "--max-val-rows", "20",
                 "--threads", "1", "--quiet"]) == 0
    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "4",
                 "--threads", "1"]) == 0
    assert main(["bench", "throughput", "--out", str(tmp_path / "tp"), "--models", *NAMES,
                 "--preset", "tiny", "--seq-len", "32", "--steps", "1", "--warmup", "0",
                 "--batch-size", "2", "--threads", "1"]) == 0
