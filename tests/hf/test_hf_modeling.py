"""GAMForCausalLM against the library GAMLM: logits, loss, hidden states, saving, checkpointing."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gam  # noqa: E402
from gam.hf import GAMCache, GAMForCausalLM, GAMModel, output_cache  # noqa: E402

VARIANTS = ["gam", "gam-sum", "gam-global-only", "gam-local-only", "gam-delta",
            "gam-delta-no-bank", "gam-delta-no-decay"]


def _ids(B=3, T=20, seed=1, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_library_bit_exact(make_lm, name):
    lm = make_lm(name)
    hf = GAMForCausalLM.from_gam(lm).eval()
    assert hf.config.gam_model_name == name
    idx = _ids()
    with torch.no_grad():
        assert torch.equal(hf(idx).logits, lm(idx)[0])
        assert torch.equal(hf(idx, use_cache=False).logits, lm(idx)[0])


@pytest.mark.parametrize("overrides", [dict(conv_kernel_size=1), dict(conv_kernel_size=5),
                                       dict(pos_embedding=False)])
def test_logits_equal_library_other_shapes(make_lm, overrides):
    lm = make_lm("gam", **overrides)
    hf = GAMForCausalLM.from_gam(lm).eval()
    idx = _ids(T=9)
    with torch.no_grad():
        assert torch.equal(hf(idx).logits, lm(idx)[0])


def test_labels_loss_equals_library_loss(make_lm):
    lm = make_lm()
    hf = GAMForCausalLM.from_gam(lm).eval()
    idx = _ids()
    labels = idx.clone()
    labels[0, :5] = -100  # ignored (e.g. a prompt)
    targets = torch.full_like(idx, -100)
    targets[:, :-1] = labels[:, 1:]  # the library takes already shifted targets
    out = hf(idx, labels=labels)
    _, ref = lm(idx, targets)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    n = int((targets != -100).sum())
    summed = hf(idx, labels=labels, num_items_in_batch=2 * n).loss
    torch.testing.assert_close(summed, ref / 2)
    loss, logits = hf(idx, labels=labels, return_dict=False)[:2]
    assert torch.equal(loss, out.loss) and logits.shape == (3, 20, 300)
    with pytest.raises(ValueError, match="labels"):
        hf(idx, labels=labels[:, :-1])


def test_output_hidden_states(make_lm):
    lm = make_lm()
    hf = GAMForCausalLM.from_gam(lm).eval()
    idx = _ids(B=2, T=7)
    out = hf(idx, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == lm.config.n_layers + 1
    assert all(h.shape == (2, 7, lm.config.d_model) for h in hs)
    final, block_inputs = lm.hidden_states(idx, output_all=True)
    for mine, ref in zip(hs[:-1], block_inputs[:-1], strict=True):
        assert torch.equal(mine, ref)  # embeddings, then each block's output
    assert torch.equal(hs[-1], final)  # the final normalised state, as HF models do
    base = GAMModel(hf.config)
    base.load_state_dict(hf.model.state_dict())
    base_out = base.eval()(idx, output_hidden_states=True)
    assert torch.equal(base_out.last_hidden_state, final)
    assert hf(idx).hidden_states is None


def test_save_load_round_trip_bit_exact(tmp_path, make_lm):
    from safetensors import safe_open

    lm = make_lm(init="paper")  # tied: the head is stored once, as the embedding
    hf = GAMForCausalLM.from_gam(lm, eos_token_id=1).eval()
    idx = _ids()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.gam.token_embedding.weight" in keys and "model.gam.head.weight" not in keys
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is GAMForCausalLM and back.config.eos_token_id == 1
    assert back.gam.token_embedding.weight is back.gam.head.weight
    with torch.no_grad():
        assert torch.equal(back(idx).logits, hf(idx).logits)
        base = transformers.AutoModel.from_pretrained(tmp_path).eval()
        assert torch.equal(base(idx).last_hidden_state, lm.hidden_states(idx)[0])
    # the wrapped GAMLM saves a library checkpoint
    gam.save_pretrained(back.gam, tmp_path / "lib")
    with torch.no_grad():
        assert torch.equal(gam.load_pretrained(tmp_path / "lib")(idx)[0], lm(idx)[0])


def _checkpointed(lm):
    model = GAMForCausalLM.from_gam(lm).train()
    with warnings.catch_warnings():  # deprecated alias of activation_checkpointing_enable in v5
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    return model


def _padded_batch():
    idx = _ids()
    mask = torch.ones_like(idx)
    mask[1, :4] = 0  # a left-padded row
    return idx, mask


@pytest.mark.parametrize("padded", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(make_lm, padded):
    lm = make_lm()
    plain = GAMForCausalLM.from_gam(lm).train()
    ckpt = _checkpointed(lm)
    idx, mask = _padded_batch()
    kwargs = {"attention_mask": mask} if padded else {}
    plain(idx, labels=idx, **kwargs).loss.backward()
    out = ckpt(idx, labels=idx, use_cache=True, **kwargs)
    assert output_cache(out) is None  # no cache while checkpointing
    out.loss.backward()
    torch.testing.assert_close(out.loss, plain(idx, labels=idx, **kwargs).loss)
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_recomputes_the_blocks(make_lm, monkeypatch):
    import gam.hf.padding as padding
    from gam.models.gam import GAMBlock

    ckpt = _checkpointed(make_lm())
    calls = []
    forward = GAMBlock.forward
    monkeypatch.setattr(GAMBlock, "forward", lambda self, x: calls.append(self) or forward(self, x))
    idx, mask = _padded_batch()
    loss = ckpt(idx, labels=idx).loss
    assert len(calls) == ckpt.config.n_layers
    loss.backward()  # each block runs again, recomputing its activations
    assert [sum(c is b for c in calls) for b in ckpt.gam.blocks] == [2] * ckpt.config.n_layers
    real = padding.block_extend  # the padded path runs the block through block_extend
    extends = []
    monkeypatch.setattr(padding, "block_extend",
                        lambda *a, **k: extends.append(1) or real(*a, **k))
    ckpt(idx, attention_mask=mask, labels=idx).loss.backward()
    assert len(extends) == 2 * ckpt.config.n_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ckpt.gradient_checkpointing_disable()
    extends.clear()
    ckpt(idx, attention_mask=mask, labels=idx).loss.backward()
    assert len(extends) == ckpt.config.n_layers


def test_inputs_embeds_and_logits_to_keep(hf_model):
    idx = _ids(B=2, T=6)
    with torch.no_grad():
        full = hf_model(idx).logits
        emb = hf_model.get_input_embeddings()(idx)
        assert torch.equal(hf_model(inputs_embeds=emb).logits, full)
        # (the head's matmul on fewer rows may round differently in the last bit)
        torch.testing.assert_close(hf_model(idx, logits_to_keep=1).logits, full[:, -1:])
        torch.testing.assert_close(hf_model(idx, logits_to_keep=torch.tensor([0, 3])).logits,
                                   full[:, [0, 3]])
    with pytest.raises(ValueError, match="exactly one"):
        hf_model(idx, inputs_embeds=emb)


def test_left_padded_forward_equals_each_row_alone(hf_model):
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batch = hf_model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = hf_model(torch.tensor([r])).logits[0]
            torch.testing.assert_close(batch[i, width - len(r):], alone, rtol=1e-5, atol=1e-5)


def test_checks(hf_model):
    with pytest.raises(ValueError, match="max_seq_len"):
        hf_model(_ids(B=1, T=65))
    with pytest.raises(ValueError, match="outside"):
        hf_model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="attention_mask"):
        hf_model(_ids(B=1, T=4), attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="GAMCache"):
        hf_model(_ids(B=1, T=4), past_key_values=transformers.DynamicCache())
    with pytest.raises(TypeError, match="GAMCache"):
        hf_model(_ids(B=1, T=4), cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="not both"):
        hf_model(_ids(B=1, T=4), cache=GAMCache(2), past_key_values=GAMCache(2))
    assert isinstance(output_cache(hf_model(_ids(B=1, T=4))), GAMCache)
