"""GAM-Delta: fast path against the reference, cached decoding, padding, receptive field."""

import pytest
import torch

from gam import build_model, count_parameters, load_pretrained, receptive_field, save_pretrained
from gam.models.gam import GAMDeltaBlock, GAMDeltaConfig, GAMDeltaLM, GAMDeltaState
from gam.models.registry import model_config

VARIANTS = {
    "gam-delta": {},
    "gam-delta-no-bank": dict(use_global=False),
    "gam-delta-no-decay": dict(use_delta_decay=False),
    "gam-delta-no-local": dict(use_local=False),
    "gam-delta-sum": dict(use_gate=False),
}
NAMES = ["gam-delta", "gam-delta-no-bank", "gam-delta-no-decay", "gam-delta-matched"]


# tiny tensors: one thread (the shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturb(module):
    with torch.no_grad():  # biases start at zero: make every parameter matter
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def _block(**switches):
    torch.manual_seed(0)
    cfg = GAMDeltaConfig(vocab_size=50, max_seq_len=64, d_model=48, n_layers=2,
                         num_memory_slots=24, dropout=0.0, delta_heads=3, delta_chunk_size=8,
                         **switches)
    return _perturb(GAMDeltaBlock(cfg).double())


def _model(name, **overrides):
    torch.manual_seed(0)
    return _perturb(build_model(name, "tiny", **overrides)).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("T", [1, 21])
def test_block_forward_matches_reference_values_and_gradients(variant, T,
                                                            check_fast_path_matches_reference):
    block = _block(**VARIANTS[variant])
    check_fast_path_matches_reference(block, torch.randn(2, T, 48, dtype=torch.float64,
                                                         requires_grad=True))


@pytest.mark.parametrize("variant", ["gam-delta", "gam-delta-no-decay"])
def test_block_extend_in_pieces_then_steps_equals_forward(variant):
    block = _block(**VARIANTS[variant])
    x = torch.randn(2, 21, 48, dtype=torch.float64)
    full = block(x)
    y1, state = block.prefill(x[:, :5])
    assert isinstance(state, GAMDeltaState)
    assert state.conv.shape == (2, 2, 48) and state.qkv.shape == (2, 3, 3 * 48)
    assert state.memory.shape == (2, 3, 16, 16)
    y2, state = block.extend(x[:, 5:14], state)  # 9 tokens: one full chunk and one partial
    ys = [y1, y2]
    for t in range(14, 21):
        y_t, state = block.step(x[:, t], state)
        ys.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-10, atol=1e-10)


def test_left_padded_extend_equals_each_row_alone_and_continues():
    block = _block()
    # row 0: 4 junk tokens then its 10-token prompt; row 1: a 14-token prompt, no padding
    x = torch.randn(2, 14, 48, dtype=torch.float64)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, :4] = False
    y, state = block.extend(x, pad_mask=mask)
    torch.testing.assert_close(y[0, 4:], block(x[0:1, 4:])[0])
    torch.testing.assert_close(y[1], block(x[1:2])[0])
    # decoding continues from the padded prefill as from each row alone
    nxt = torch.randn(2, 48, dtype=torch.float64)
    y_next, _ = block.step(nxt, state)
    torch.testing.assert_close(y_next[0], block(torch.cat([x[0:1, 4:], nxt[0:1, None]], 1))[0, -1])
    torch.testing.assert_close(y_next[1], block(torch.cat([x[1:2], nxt[1:2, None]], 1))[0, -1])


@pytest.mark.parametrize("name", ["gam-delta", "gam-delta-no-bank"])
@pytest.mark.parametrize("prompt_len", [1, 9, 63])
def test_cached_decoding_equals_full_forward(name, prompt_len, check_cached_decoding):
    model = _model(name, delta_chunk_size=16)  # several chunks, ragged prompts
    check_cached_decoding(model, prompt_len, dict(atol=1e-4, rtol=0))


def test_bf16_cached_decoding_runs_with_float32_memory(check_bf16_cached_decoding):
    check_bf16_cached_decoding(_model("gam-delta"))


def test_save_and_load_round_trip(tmp_path):
    model = _model("gam-delta-no-decay")
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.model_name == "gam-delta-no-decay" and isinstance(loaded, GAMDeltaLM)
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_recurrent_impl_equals_chunked():
    chunked = _model("gam-delta", delta_chunk_size=8)
    recurrent = build_model("gam-delta", "tiny", delta_impl="recurrent").eval()
    recurrent.load_state_dict(chunked.state_dict())
    idx = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(chunked(idx)[0], recurrent(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_causal_and_sees_the_whole_context(name, logit_dependence):
    # tiny: 2 layers of kernel 3, so GAM's field is 5 tokens; T = 20 is well beyond it
    model = _model(name)
    dep = logit_dependence(model, 20)
    assert not torch.triu(dep, diagonal=1).any()  # no position looks at a future token
    assert dep[torch.ones(20, 20, dtype=torch.bool).tril()].all()  # and sees all before it
    assert receptive_field(model) == model.config.max_seq_len == 64
    assert receptive_field(model.config) == 64
    gam_dep = logit_dependence(_model("gam"), 20)
    assert not gam_dep[19, 0] and receptive_field(_model("gam")) == 5


def test_changing_a_future_token_leaves_past_logits_unchanged(
        check_future_token_leaves_past_unchanged):
    check_future_token_leaves_past_unchanged(_model("gam-delta"))


def test_paper_size_parameter_counts():
    with torch.device("meta"):
        counts = {n: count_parameters(build_model(n, "paper", init="paper"))["total"]
                  for n in ["gam", *NAMES]}
    assert counts["gam"] == 22_599_680
    assert counts["gam-delta"] == 30_529_328
    assert abs(counts["gam-delta-matched"] - 22_599_680) / 22_599_680 < 0.01
    d, L, slots, H = 512, 6, 512, 4
    # no bank: its slots and its gate chunk
    assert counts["gam-delta"] - counts["gam-delta-no-bank"] == L * (slots * d + d * d + d)
    assert counts["gam-delta"] - counts["gam-delta-no-decay"] == L * (d * H + 2 * H)
    # the delta path of one block: qkv, its conv, beta, decay (proj, A_log, dt_bias), norm, out
    inner = 512
    delta = 3 * d * inner + 3 * inner * 4 + d * H + d * H + 2 * H + 128 + inner * d
    assert counts["gam-delta"] - counts["gam"] == L * (delta + d * d + d)  # + the third gate


def test_ablation_structure():
    assert build_model("gam-delta-no-bank", "tiny").blocks[0].memory_bank is None
    block = build_model("gam-delta-no-decay", "tiny").blocks[0]
    assert block.delta.a_proj is None and block.delta.A_log is None
    block = build_model("gam-delta", "tiny").blocks[0]
    assert block.gate.out_features == 3 * 32 and block.memory_bank is not None
    assert build_model("gam-delta-no-bank", "tiny").blocks[0].gate.out_features == 2 * 32
    assert isinstance(build_model("gam-delta", "tiny"), GAMDeltaLM)


def test_decay_starts_in_range_and_stays_at_most_one():
    block = build_model("gam-delta", "tiny").blocks[0].delta
    h = 10 * torch.randn(3, 7, 32)
    beta, g = block._gates(h, None)
    assert ((beta > 0) & (beta < 1)).all() and (g <= 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(delta_heads=0), "delta_heads must be an integer >= 1, got 0"),
    (dict(delta_heads=5), "d_model 32 is not divisible by delta_heads 5"),
    (dict(delta_head_dim=0), "delta_head_dim must be an integer >= 1 or None, got 0"),
    (dict(delta_conv_size=0), "delta_conv_size must be an integer >= 1, got 0"),
    (dict(delta_chunk_size=-1), "delta_chunk_size must be an integer >= 1, got -1"),
    (dict(delta_impl="fast"), "delta_impl must be one of .* got 'fast'"),
    (dict(use_delta_decay="yes"), "use_delta_decay must be a bool, got 'yes'"),
    (dict(use_local=False, use_global=False), "at least one path"),
])
def test_bad_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_config("gam-delta", "tiny", **kwargs)


def test_head_dim_override_and_presets():
    assert model_config("gam-delta", "paper").delta_head_dim_value == 128
    assert model_config("gam-delta", "cpu-small").delta_head_dim_value == 64
    assert model_config("gam-delta", "tiny", delta_heads=5, delta_head_dim=6).delta_heads == 5


def test_tiny_model_trains_and_bf16_is_finite():
    torch.manual_seed(0)
    model = build_model("gam-delta", "tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
