"""GAM block: fast path against the paper's reference, ablations, receptive field."""

import pytest
import torch

import gam.models.ops.memory_retrieval as retrieval_module
from gam import build_model, count_parameters, receptive_field
from gam.models.gam import GAMBlock, GAMConfig
from gam.models.ops.conv import causal_depthwise_conv
from gam.models.ops.memory_retrieval import memory_retrieval, memory_retrieval_reference

VARIANTS = {
    "gam": {},
    "gam-global-only": dict(use_local=False, use_gate=False),
    "gam-sum": dict(use_gate=False),
    "gam-local-only": dict(use_global=False, use_gate=False),
}


def _block(kernel=3, retrieval="fused", **switches):
    torch.manual_seed(0)
    cfg = GAMConfig(vocab_size=50, max_seq_len=64, d_model=48, n_layers=2,
                    num_memory_slots=24, conv_kernel_size=kernel, dropout=0.0,
                    retrieval=retrieval, **switches)
    block = GAMBlock(cfg).double()
    with torch.no_grad():  # non-trivial conv bias and gate so every term matters
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("retrieval", ["fused", "sdpa"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("T", [1, 2, 17])
def test_block_fast_path_matches_reference_values_and_gradients(variant, kernel, T, retrieval):
    block = _block(kernel, retrieval, **VARIANTS[variant])
    x = torch.randn(3, T, 48, dtype=torch.float64, requires_grad=True)
    y_fast = block(x)
    g_out = torch.randn_like(y_fast)
    grads_fast = torch.autograd.grad(y_fast, [x, *block.parameters()], g_out)
    y_ref = block.forward_reference(x)
    grads_ref = torch.autograd.grad(y_ref, [x, *block.parameters()], g_out)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    for gf, gr in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", ["fused", "sdpa"])
@pytest.mark.parametrize("chunk", [7, 8192])
def test_memory_retrieval_matches_softmax_formula_float32_and_grads(impl, chunk, monkeypatch):
    monkeypatch.setattr(retrieval_module, "_RETRIEVAL_CHUNK", chunk)  # 7: several uneven chunks
    torch.manual_seed(1)
    h = torch.randn(2, 33, 64, requires_grad=True)
    mem = (0.1 * torch.randn(40, 64)).requires_grad_()
    out = memory_retrieval(h, mem, impl)
    ref = torch.softmax(h @ mem.T, dim=-1) @ mem
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, [h, mem], g)
    gb = torch.autograd.grad(memory_retrieval_reference(h, mem), [h, mem], g)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_causal_conv_is_causal_and_matches_explicit_sum():
    torch.manual_seed(2)
    h = torch.randn(1, 6, 4)
    w = torch.randn(4, 1, 3)
    b = torch.randn(4)
    y = causal_depthwise_conv(h, w, b)
    padded = torch.cat([torch.zeros(1, 2, 4), h], dim=1)
    for t in range(6):
        expected = (padded[0, t:t + 3] * w[:, 0, :].T).sum(0) + b
        torch.testing.assert_close(y[0, t], expected)


PAPER_COUNTS = {  # computed from the architecture; paper Table 3 rounds to 19.4M/19.4M/17.9M
    "gam": 22_599_680,
    "gam-global-only": 19_435_520,
    "gam-sum": 19_447_808,
    "gam-local-only": 17_874_944,
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_size_parameter_counts(name):
    with torch.device("meta"):
        model = build_model(name, "paper", init="paper")
    assert count_parameters(model)["total"] == PAPER_COUNTS[name]


def test_paper_rounded_figures_of_table3():
    assert round(PAPER_COUNTS["gam-global-only"] / 1e6, 1) == 19.4
    assert round(PAPER_COUNTS["gam-sum"] / 1e6, 1) == 19.4
    assert round(PAPER_COUNTS["gam-local-only"] / 1e6, 1) == 17.9


def test_ablation_structure():
    assert build_model("gam-global-only", "tiny").blocks[0].causal_conv is None
    assert build_model("gam-global-only", "tiny").blocks[0].gate is None
    assert build_model("gam-local-only", "tiny").blocks[0].memory_bank is None
    sum_block = build_model("gam-sum", "tiny").blocks[0]
    assert sum_block.gate is None and sum_block.memory_bank is not None


def test_weight_tying():
    model = build_model("gam", "tiny", init="paper")
    assert model.head.weight is model.token_embedding.weight


def test_receptive_field_paper_config_is_13_tokens_by_gradients(logit_dependence):
    # Paper depth and kernel (6 layers, kernel 3) at a small width so the test is fast.
    torch.manual_seed(0)
    model = build_model("gam", "paper", vocab_size=64, d_model=32, num_memory_slots=16,
                        max_seq_len=40, dropout=0.0)
    assert receptive_field(model) == 13 == 1 + 6 * (3 - 1)
    dep = logit_dependence(model, 40)
    for t in range(40):
        depends_on = set(torch.nonzero(dep[t])[:, 0].tolist())
        assert depends_on == set(range(max(0, t - 12), t + 1)), t


@pytest.mark.parametrize("name", ["gam", "gam-global-only", "gam-sum", "gam-local-only",
                                  "transformer", "transformer-naive"])
def test_no_model_looks_at_future_tokens(name, logit_dependence):
    torch.manual_seed(0)
    model = build_model(name, "tiny")
    dep = logit_dependence(model, 12)
    assert not torch.triu(dep, diagonal=1).any()
    assert dep.diagonal().all()


def test_global_only_has_receptive_field_one(logit_dependence):
    model = build_model("gam-global-only", "tiny")
    assert receptive_field(model) == 1
    dep = logit_dependence(model, 8)
    assert torch.equal(dep, torch.eye(8, dtype=torch.bool))


def test_fused_retrieval_bf16_close_to_float32_reference():
    torch.manual_seed(3)
    h = torch.randn(4, 64, 128)
    mem = torch.nn.init.xavier_uniform_(torch.empty(96, 128))
    ref = memory_retrieval_reference(h, mem)
    out = memory_retrieval(h.bfloat16(), mem.bfloat16(), "fused").float()
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_unknown_retrieval_is_rejected():
    with pytest.raises(ValueError, match="retrieval must be one of"):
        GAMConfig(retrieval="magic")


def test_bf16_autocast_forward_backward_finite():
    model = build_model("gam", "tiny")
    idx = torch.randint(0, 256, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_extend_in_chunks_and_with_left_padding_equals_forward(variant):
    block = _block(3, **VARIANTS[variant])
    x = torch.randn(2, 11, 48, dtype=torch.float64)
    full = block(x)
    y1, state = block.extend(x[:, :4])
    y2, _ = block.extend(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full)
    padded = torch.cat([torch.randn(2, 3, 48, dtype=torch.float64), x], dim=1)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[:, :3] = False
    y, _ = block.extend(padded, pad_mask=mask)
    torch.testing.assert_close(y[:, 3:], full)
