import pytest

from gam.bench.flops import flops_breakdown, flops_per_token
from gam.models.registry import model_config


def _gam_forward(c) -> float:
    """Forward FLOPs per token written out from the config (the issue's formula)."""
    d, s, k = c.d_model, c.num_memory_slots, c.conv_kernel_size
    gate = 2 * d * 2 * d
    memory = 2 * (2 * s * d)  # scores and readout
    ffn = 2 * (d * c.ffn_mult * d) * 2
    conv = 2 * k * d
    head = 2 * d * c.vocab_size
    return c.n_layers * (gate + memory + ffn + conv) + head


def test_gam_paper_flops_match_the_formula_and_144m():
    c = model_config("gam", "paper")
    expected = 3 * _gam_forward(c)
    got = flops_per_token("gam", 256)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(144.0e6, rel=0.005)
    assert flops_per_token(c, 256) == got  # a config works as well as a name
    assert flops_per_token("gam", 256, training=False) == pytest.approx(got / 3)
    assert flops_per_token("gam", 4096) == got  # GAM's cost does not depend on T


def test_transformer_paper_flops_153m_at_256():
    c = model_config("transformer", "paper")
    d, t = c.d_model, 256
    layer = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * 4 * d + 2 * 2 * t * d
    expected = 3 * (c.n_layers * layer + 2 * d * c.vocab_size)
    assert flops_per_token("transformer", t) == pytest.approx(expected, rel=1e-12)
    assert flops_per_token("transformer", t) == pytest.approx(153.4e6, rel=0.005)
    halved = flops_per_token("transformer", t, causal_halved=True)
    assert expected - halved == pytest.approx(3 * c.n_layers * 2 * t * d)


def test_mamba_flops_from_config():
    try:
        c = model_config("mamba", "paper")
    except ImportError:
        pytest.skip("gam.models.mamba is not available")
    d, e, n = c.d_model, c.d_inner, c.d_state
    r = c.dt_rank_value
    layer = (2 * d * 2 * e + 2 * c.d_conv * e + 2 * e * (r + 2 * n) + 2 * r * e + 2 * e * d
             + 9 * e * n)
    expected = 3 * (c.n_layers * layer + 2 * d * c.vocab_size)
    assert flops_per_token("mamba", 256) == pytest.approx(expected, rel=1e-12)


def test_breakdown_parts_sum_to_total():
    parts = flops_breakdown("gam", 256, training=False)
    assert parts["head"] == 2 * 512 * 10000
    assert parts["memory"] == 6 * 4 * 512 * 512
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"]
