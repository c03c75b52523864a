"""The attention pieces of ``gam.models.ops.attention`` shared by the Transformer families:
head split / merge, the preallocated KV cache, the attention FLOPs."""

import pytest
import torch
import torch.nn.functional as F

from gam.models.ops import attention as ops

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_split_and_merge_heads_are_inverse_and_split_the_channels_in_order():
    x = torch.randn(2, 5, 12)
    h = ops.split_heads(x, 3)  # (B, H, T, hd)
    assert h.shape == (2, 3, 5, 4)
    assert torch.equal(h[:, 1], x[..., 4:8])  # head 1 holds channels 4..7
    assert torch.equal(ops.merge_heads(h), x)


def test_kv_cache_steps_attend_like_causal_attention_over_the_whole_sequence():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 8, dtype=torch.float64)  # 3 x (B, H, T, hd)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
    cache = ops.kv_cache_from_prefill(k[:, :, :4], v[:, :, :4], max_len=16)
    assert cache["k"].shape == (2, 4, 16, 8) and cache["len"] == 4
    assert ops.kv_cache_filled_bytes(cache) == 2 * (2 * 4 * 4 * 8) * 8
    for t in range(4, 9):
        keys, values = ops.kv_cache_append(cache, k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert cache["len"] == t + 1 and keys.shape == (2, 4, t + 1, 8)
        y = F.scaled_dot_product_attention(q[:, :, t:t + 1], keys, values)
        torch.testing.assert_close(y, full[:, :, t:t + 1], rtol=1e-12, atol=1e-12)
    assert not cache["k"][:, :, 9:].any()  # nothing written past len


def test_attention_flops_full_and_causal_halved():
    assert ops.attention_mixing_flops(512, 256) == 4 * 256 * 512
    assert ops.attention_mixing_flops(512, 256, causal_halved=True) == 2 * 256 * 512
