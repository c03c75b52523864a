"""generate() with GAM's O(1) conv-state cache: cached == uncached, beam search, left padding."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gam.hf import CACHE_ARG, GAMCache, GAMForCausalLM, output_cache  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]


def _left_pad(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _gen(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    return model.generate(ids, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, **kwargs)


@pytest.mark.parametrize("name", ["gam", "gam-delta"])
def test_greedy_cached_equals_uncached_and_library(make_lm, name):
    lm = make_lm(name)
    hf = GAMForCausalLM.from_gam(lm, pad_token_id=0).eval()
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    cached = _gen(hf, ids)
    uncached = _gen(hf, ids, use_cache=False)
    assert isinstance(output_cache(cached), GAMCache)
    assert output_cache(cached).get_seq_length() == ids.shape[1] + 11
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.sequences, lm.generate(ids, 12, temperature=0))


@pytest.mark.parametrize("name", ["gam", "gam-local-only", "gam-delta"])
def test_beam_search_cached_equals_uncached(make_lm, name):
    hf = GAMForCausalLM.from_gam(make_lm(name), pad_token_id=0, eos_token_id=1).eval()
    ids = torch.tensor([PROMPTS[0][:4], PROMPTS[2]])
    kwargs = dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, do_sample=False,
                  length_penalty=0.0)
    cached = hf.generate(ids, **kwargs)
    uncached = hf.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (4, 14)
    assert torch.equal(cached, uncached)


@pytest.fixture(params=["gam", "gam-delta"])
def any_hf_model(request, make_lm):
    from gam.hf import GAMForCausalLM as Model

    return Model.from_gam(make_lm(request.param), pad_token_id=0, eos_token_id=1).eval()


def test_left_padded_batch_equals_each_prompt_alone(any_hf_model):
    hf_model = any_hf_model
    ids, mask = _left_pad(PROMPTS)
    batch = _gen(hf_model, ids, attention_mask=mask)
    for i, prompt in enumerate(PROMPTS):
        alone = _gen(hf_model, torch.tensor([prompt]))
        assert torch.equal(batch.sequences[i, ids.shape[1]:], alone.sequences[0, len(prompt):])
        for a, b in zip(batch.logits, alone.logits, strict=True):
            torch.testing.assert_close(a[i], b[0], rtol=1e-5, atol=1e-5)
    # and without the cache (the padded prefix is re-run, masked, at every step)
    uncached = _gen(hf_model, ids, attention_mask=mask, use_cache=False)
    assert torch.equal(uncached.sequences, batch.sequences)


def test_left_padded_beam_search_equals_each_prompt_alone(any_hf_model):
    hf_model = any_hf_model
    ids, mask = _left_pad(PROMPTS[:3])
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, length_penalty=0.0)
    batch = hf_model.generate(ids, attention_mask=mask, **kwargs)
    for i, prompt in enumerate(PROMPTS[:3]):
        alone = hf_model.generate(torch.tensor([prompt]), **kwargs)
        assert torch.equal(batch[i, ids.shape[1]:], alone[0, len(prompt):])


def test_sampling_top_k_top_p(hf_model):
    ids = torch.tensor([PROMPTS[0]] * 3)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(0)
    a = hf_model.generate(ids, **kwargs)
    torch.manual_seed(0)
    b = hf_model.generate(ids, **kwargs)
    assert torch.equal(a, b) and a.shape == (3, 17)
    assert int(a.max()) < hf_model.config.vocab_size
    top1 = hf_model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1)
    assert torch.equal(top1, hf_model.generate(ids, max_new_tokens=10, do_sample=False))


def test_cache_continues_a_sequence_in_chunks(any_hf_model):
    hf_model = any_hf_model
    ids, mask = _left_pad(PROMPTS)
    more = torch.tensor([[20, 21, 22]] * len(PROMPTS))
    full_ids = torch.cat([ids, more], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(more)], dim=1)
    with torch.no_grad():
        full = hf_model(full_ids, attention_mask=full_mask).logits
        first = hf_model(ids, attention_mask=mask, use_cache=True)
        cache = output_cache(first)
        assert cache.next_position.tolist() == [len(p) for p in PROMPTS]
        # the mask may cover the cached tokens and the new ones, or the new ones only
        second = hf_model(more, attention_mask=full_mask, past_key_values=cache).logits
        cache_b = output_cache(hf_model(ids, attention_mask=mask))
        third = hf_model(more, cache=cache_b).logits  # both argument names are accepted
        real = mask.bool()
    torch.testing.assert_close(first.logits[real], full[:, :ids.shape[1]][real])
    torch.testing.assert_close(second, full[:, ids.shape[1]:])
    torch.testing.assert_close(third, full[:, ids.shape[1]:])


def test_cache_reorder_and_select():
    cache = GAMCache(2)
    cache.conv_states = [torch.arange(3.0)[:, None, None].expand(3, 2, 4).clone(), None]
    cache.next_position = torch.tensor([5, 6, 7])
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.conv_states[0][:, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert cache.next_position.tolist() == [7, 7, 5] and cache.batch_size == 3
    cache.batch_repeat_interleave(2)
    assert cache.next_position.tolist() == [7, 7, 7, 7, 5, 5]
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert cache.next_position.tolist() == [7, 5] and len(cache) == 2
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.conv_states == [None, None]


def test_generating_past_the_context_raises_clearly(hf_model):
    ids = torch.tensor([PROMPTS[0]])
    out = hf_model.generate(ids, max_length=hf_model.config.max_seq_len, do_sample=False)
    assert out.shape[1] == hf_model.config.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        hf_model.generate(ids, max_new_tokens=hf_model.config.max_seq_len, do_sample=False)


def test_user_cache_continuation_and_chunked_prefill(any_hf_model):
    hf_model = any_hf_model
    ids = torch.tensor([PROMPTS[0], PROMPTS[2] + PROMPTS[1] + [19]])
    ref = hf_model.generate(ids, max_new_tokens=12, do_sample=False)
    out = hf_model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                            **{CACHE_ARG: GAMCache(config=hf_model.config)})
    assert torch.equal(out.sequences, ref[:, :-4])
    # generate again from the returned cache: only the tokens it has not seen are run
    more = hf_model.generate(out.sequences, max_new_tokens=4, do_sample=False,
                             **{CACHE_ARG: output_cache(out)})
    assert torch.equal(more, ref)
    # the other name works too (transformers >= 5.24 renames it, with its own warning)
    for name in ("past_key_values", "cache"):
        try:
            again = hf_model.generate(ids, max_new_tokens=12, do_sample=False,
                                      **{name: GAMCache(config=hf_model.config)})
        except (TypeError, ValueError) as exc:  # a release that knows only one of the names
            assert name != CACHE_ARG, exc
            continue
        assert torch.equal(again, ref), name
    if hasattr(transformers.GenerationConfig(), "prefill_chunk_size"):  # transformers 5
        chunked = hf_model.generate(ids, max_new_tokens=12, do_sample=False, prefill_chunk_size=3,
                                    **{CACHE_ARG: GAMCache(config=hf_model.config)})
        assert torch.equal(chunked, ref)


def test_our_generation_paths_warn_nothing(hf_model, hf_warnings):
    """Greedy, beam search, left padding and a user cache under this release's argument name:
    no deprecation warning and no max_length/max_new_tokens clash from our code."""
    ids, mask = _left_pad(PROMPTS[:2])
    hf_warnings.clear()
    hf_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    hf_model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                            return_dict_in_generate=True,
                            **{CACHE_ARG: GAMCache(config=hf_model.config)})
    assert output_cache(out).get_seq_length() == ids.shape[1] + 2
    with torch.no_grad():
        output_cache(hf_model(ids, attention_mask=mask, use_cache=True))
    assert hf_warnings.messages() == []
