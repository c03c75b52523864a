"""The shared LM shell: cached decoding == full forward for every family, generation, errors."""

import importlib.util

import pytest
import torch

from gam import build_model
from gam.models.sampling import sample_next_token

HAS_MAMBA = importlib.util.find_spec("gam.models.mamba") is not None
FAMILIES = ["gam", "gam-global-only", "gam-sum", "gam-local-only", "transformer",
            "transformer-naive", "transformer-pp", "gam-delta", "s4d", "rwkv7"] + (
                ["mamba", "mamba-paper"] if HAS_MAMBA else [])


def _model(name, **overrides):
    torch.manual_seed(0)
    model = build_model(name, "tiny", **overrides)
    with torch.no_grad():  # make every parameter matter (biases start at zero)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("prompt_len", [1, 9, 63])
def test_cached_decoding_equals_full_forward(name, prompt_len):
    model = _model(name)
    T = model.config.max_seq_len  # 64
    idx = torch.randint(0, model.config.vocab_size, (2, T))
    full, _ = model(idx)  # (B, T, V)
    logits, cache = model.prefill(idx[:, :prompt_len])
    torch.testing.assert_close(logits, full[:, prompt_len - 1], atol=1e-4, rtol=0)
    for t in range(prompt_len, T):
        logits, cache = model.step(idx[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=0)
    assert cache.seq_len == T


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generate_equals_uncached_argmax(name):
    model = _model(name)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    out = model.generate(prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):
        nxt = model(seq)[0][:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_generation_past_max_seq_len_crops_context_like_uncached():
    model = _model("gam", max_seq_len=16)
    prompt = torch.randint(0, 256, (1, 10))
    out = model.generate(prompt, 20, temperature=0)
    seq = prompt
    for _ in range(20):
        nxt = model(seq[:, -16:])[0][:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert out.shape == (1, 30)
    assert torch.equal(out, seq)


def test_sampling_seed_reproducible_and_stream_matches_generate():
    model = _model("gam")
    prompt = torch.randint(0, 256, (3, 4))
    a = model.generate(prompt, 10, temperature=0.9, top_k=20, top_p=0.9, seed=123)
    b = model.generate(prompt, 10, temperature=0.9, top_k=20, top_p=0.9, seed=123)
    assert torch.equal(a, b)
    streamed = list(model.generate_stream(prompt, 10, temperature=0.9, top_k=20, top_p=0.9,
                                          seed=123))
    assert torch.equal(torch.stack(streamed, 1), a[:, 4:])


def test_eos_stops_generation_and_pads_finished_rows():
    model = _model("gam")
    prompt = torch.randint(0, 256, (1, 3))
    greedy = model.generate(prompt, 6, temperature=0)
    eos = int(greedy[0, 4])  # the second generated token
    out = model.generate(prompt, 6, temperature=0, eos_token_id=eos)
    assert out.shape[1] <= greedy.shape[1]
    assert int(out[0, -1]) == eos
    assert eos not in out[0, 3:-1].tolist()


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    samples = {int(sample_next_token(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert samples == {0, 1}
    # softmax of [5, 4, ...]: p0 ~ 0.70, p0 + p1 ~ 0.96; top_p 0.5 keeps only token 0
    samples = {int(sample_next_token(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert samples == {0}
    samples = {int(sample_next_token(logits, 1.0, top_p=0.9, generator=g)) for _ in range(300)}
    assert samples == {0, 1}
    assert int(sample_next_token(logits, 0.0)) == 0


def test_loss_ignores_minus_100_and_matches_cross_entropy():
    model = _model("gam")
    idx = torch.randint(0, 256, (2, 10))
    targets = torch.randint(0, 256, (2, 10))
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1, 2, 256]]), "token id 256 is outside"),
    (torch.tensor([[1, -1, 2]]), "token id -1 is outside"),
    (torch.zeros(1, 65, dtype=torch.long), "exceeds max_seq_len 64.*max_seq_len=65"),
    (torch.zeros(1, 4), "dtype torch.float32"),
    (torch.zeros(4, dtype=torch.long), r"shape \(batch, seq_len\), got shape \(4,\)"),
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
    ([[1, 2]], "must be a torch.Tensor"),
])
def test_bad_input_ids_raise_clear_errors(bad, match):
    model = _model("gam")
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_bad_targets_and_sampling_arguments():
    model = _model("gam")
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(idx, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target ids"):
        model(idx, torch.full((1, 4), 999))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(idx, 2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 2, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 2, temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, -1)


@pytest.mark.parametrize("name", ["gam", "transformer", "transformer-pp", "mamba"])
def test_torch_compile_matches_eager_loss_and_gradients(name):
    """`--compile` works for all three families (inductor on CPU needs a C++ compiler, which
    the Mamba scan kernel needs too)."""
    torch.manual_seed(0)
    model = build_model(name, "tiny")
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    targets = idx.clone()
    targets[0, :3] = -100  # the ignored-target path of the compiled loss too
    _, ref = model(idx, targets, return_logits=False)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    _, loss = torch.compile(model)(idx, targets, return_logits=False)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pos_embedding_std_initialises_and_validates():
    torch.manual_seed(0)
    paper = build_model("gam", "tiny", max_seq_len=256, init="paper")
    small = build_model("gam", "tiny", max_seq_len=256, pos_embedding_std=0.02)
    assert 0.9 < paper.pos_embedding.weight.std().item() < 1.1  # nn.Embedding's N(0, 1)
    assert 0.018 < small.pos_embedding.weight.std().item() < 0.022
    for bad in (0, -1.0, True, "0.02"):
        with pytest.raises(ValueError, match="pos_embedding_std"):
            build_model("gam", "tiny", pos_embedding_std=bad)


def test_final_norm_is_the_configs_and_a_bad_one_is_refused():
    model = build_model("gam", "tiny", final_norm="rmsnorm")
    assert isinstance(model.ln_f, torch.nn.RMSNorm)
    assert isinstance(build_model("gam", "tiny").ln_f, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="final_norm"):
        build_model("gam", "tiny", final_norm="batchnorm")
