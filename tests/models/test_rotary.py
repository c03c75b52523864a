"""Rotary position embeddings (``gam.models.ops.rotary``): the fast path against the explicit
2x2 block rotation reference (values and gradients, float64), relative positions, and
positions that continue across decode steps."""

import math

import pytest
import torch

from gam.models.ops.rotary import (
    ROTARY_BASE,
    apply_rotary,
    apply_rotary_reference,
    rotary_angles,
    rotation_matrices,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("start_pos", [0, 7])
@pytest.mark.parametrize("base", [ROTARY_BASE, 37.0])
def test_fast_path_matches_the_rotation_matrix_values_and_gradients(start_pos, base):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 16, dtype=torch.float64, requires_grad=True)  # (B, H, T, hd)
    positions = torch.arange(start_pos, start_pos + 11)
    y = apply_rotary(x, start_pos, base)
    y_ref = apply_rotary_reference(x, positions, base)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g_out = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, g_out)
    (g_ref,) = torch.autograd.grad(y_ref, x, g_out)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, start_pos, base),
                                    (x[:1, :1, :4].detach().requires_grad_(),))


def test_reference_is_the_documented_rotation_of_each_pair():
    R = rotation_matrices(torch.tensor([3]), 4)[0]
    a0, a1 = 3.0, 3.0 * ROTARY_BASE ** (-2 / 4)  # p * theta_i, theta_i = base^(-2i / hd)
    c0, s0, c1, s1 = math.cos(a0), math.sin(a0), math.cos(a1), math.sin(a1)
    # rotate-half layout: pair i is (i, i + hd/2)
    expected = torch.tensor([[c0, 0, -s0, 0], [0, c1, 0, -s1], [s0, 0, c0, 0], [0, s1, 0, c1]],
                            dtype=torch.float64)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-15)
    assert torch.allclose(R @ R.T, torch.eye(4, dtype=torch.float64), atol=1e-15)  # orthogonal


def test_scores_depend_only_on_relative_positions():
    torch.manual_seed(0)
    q, k = torch.randn(2, 32, dtype=torch.float64)  # one query and one key vector
    hd = q.shape[-1]

    def score(m, n):
        qm = apply_rotary(q.expand(1, hd), m)[0]  # one position, (1, hd) -> (hd,)
        kn = apply_rotary(k.expand(1, hd), n)[0]
        return float(qm @ kn)

    for m, n in [(0, 0), (5, 2), (2, 5), (17, 3)]:
        for s in (1, 9, 200):
            assert score(m, n) == pytest.approx(score(m + s, n + s), rel=1e-12, abs=1e-12)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-6)  # and the offset matters


def test_positions_continue_across_steps():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 10, 8, dtype=torch.float64)
    whole = apply_rotary(x, 0)
    prefix = apply_rotary(x[:, :, :6], 0)
    steps = [apply_rotary(x[:, :, t:t + 1], t) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=2), whole, rtol=0, atol=0)
    assert not torch.allclose(apply_rotary(x[:, :, 6:7], 0), whole[:, :, 6:7])


def test_low_precision_input_is_rotated_in_float32_and_keeps_its_dtype():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 200, 8)
    y = apply_rotary(x.bfloat16(), 0)
    assert y.dtype == torch.bfloat16
    exact = apply_rotary(x.bfloat16().float(), 0)
    # one bf16 rounding of the result, not of the tables or the angles
    torch.testing.assert_close(y.float(), exact, rtol=2 ** -8, atol=1e-6)


def test_angles_and_odd_head_dims():
    angles = rotary_angles(torch.arange(3), 6, dtype=torch.float64)
    assert angles.shape == (3, 3) and angles[0].abs().max() == 0 and angles[1, 0] == 1.0
    with pytest.raises(ValueError, match="even head dimension >= 2, got 5"):
        apply_rotary(torch.randn(1, 1, 2, 5), 0)
