"""What tools ask a family, through the block interface of ``lm.py`` (never by type): receptive
field, gate paths, context-mixing FLOPs, decode-state bytes and optimizer hints, for every
registered name."""

import pytest
import torch

from gam import build_model, receptive_field
from gam.models.blocks import (
    block_decode_state_bytes,
    block_gate_paths,
    block_mixing_flops,
    parameter_optimizer_hints,
    state_nbytes,
)
from gam.models.registry import MODELS
from gam.training.optim import parameter_groups

EXPECTED_GATES = {
    "gam": ["local", "global"], "gam-delta": ["local", "global", "delta"],
    "gam-delta-no-bank": ["local", "delta"], "gam-delta-no-decay": ["local", "global", "delta"],
    "gam-delta-matched": ["local", "global", "delta"],
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_block_interface(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny").eval()
    c = model.config
    assert receptive_field(model) == receptive_field(c) == c.receptive_field
    expected_rf = 1 + c.n_layers * (c.conv_kernel_size - 1) if name in (
        "gam", "gam-sum", "gam-local-only") else (1 if name == "gam-global-only" else
                                                  c.max_seq_len)
    assert c.receptive_field == expected_rf
    block = model.blocks[0]
    assert block_gate_paths(block) == EXPECTED_GATES.get(name, [])
    if block_gate_paths(block):  # one gate chunk per path
        assert block.gate.out_features == len(block_gate_paths(block)) * c.d_model
    flops = block_mixing_flops(block, 64)
    kinds = {"gam-local-only": set(), "gam-delta-no-bank": {"delta"}, "s4d": {"ssm"},
             "rwkv7": {"recurrence"}}.get(name)
    if name.startswith("gated-deltanet"):
        kinds = {"delta"}
    if kinds is None:
        kinds = ({"memory", "delta"} if name.startswith("gam-delta") else {"memory"}
                 if name.startswith("gam") else {"attention"} if name.startswith("transformer")
                 else {"scan"})
    assert set(flops) == kinds and all(v > 0 for v in flops.values())
    if name.startswith("transformer"):
        assert block_mixing_flops(block, 64, causal_halved=True)["attention"] == \
            flops["attention"] / 2
        assert block_mixing_flops(block, 128)["attention"] == 2 * flops["attention"]
    if "delta" in flops:  # the chunk's pairwise products are triangular; the state ones not
        halved = block_mixing_flops(block, 64, causal_halved=True)["delta"]
        mem = block.mixer if name.startswith("gated-deltanet") else block.delta
        H, dk, dv, C = mem.n_heads, mem.head_dim, mem.value_dim, min(c.delta_chunk_size, 64)
        assert flops["delta"] - halved == H * C * (3 * dk + 2 * dv)
    if "recurrence" in flops:  # RWKV-7's nine chunk products are triangular; the state ones not
        halved = block_mixing_flops(block, 64, causal_halved=True)["recurrence"]
        H, N, C = c.n_heads, c.head_size, min(c.chunk_size, 64)
        assert flops["recurrence"] - halved == H * 9 * C * N
        assert halved == H * (9 * C * N + 8 * N * N)
    with torch.no_grad():
        _, cache = model.prefill(torch.randint(0, c.vocab_size, (2, 5)))
    state = cache.layers[0]
    used = block_decode_state_bytes(block, state)
    assert 0 < used <= state_nbytes(state)
    if name.startswith("transformer"):  # 5 of max_seq_len positions of K and V are filled
        assert used == state_nbytes(state) * 5 // c.max_seq_len
    else:
        assert used == state_nbytes(state)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_causal_and_sees_its_receptive_field(name, logit_gradients, perturb):
    """Position t's logits depend on tokens t - rf + 1 .. t and on nothing else (rf the
    receptive field), parameters perturbed so that no zero-initialised path hides a link.
    A link is a gradient above 1e-6 of the largest: an FFT convolution (s4d) leaks float32
    roundoff (about 5e-9 of the largest) to every position; the true links are above 1e-3."""
    torch.manual_seed(0)
    model = perturb(build_model(name, "tiny")).eval()
    T, rf = 20, receptive_field(model)
    grads = logit_gradients(model, T)
    dep = grads > 1e-6 * grads.max()
    t, s = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    expected = (s <= t) & (s > t - rf)
    assert torch.equal(dep, expected), f"{name}: dependence differs from rf {rf}"


# the families whose modules give optimizer hints, and the parameter names they hint per block
HINTED = {"s4d": {"ssm.log_dt", "ssm.log_A_real", "ssm.A_imag"}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_optimizer_hints_and_groups(name):
    """Only a family that gives hints gets optimizer groups beyond the decay filter's; every
    other family's groups are the filter's alone, on the run's learning rate."""
    model = build_model(name, "tiny")
    names = {id(p): n for n, p in model.named_parameters()}
    hinted = {names[id(p)] for p, _ in parameter_optimizer_hints(model)}
    expected = {f"blocks.{i}.{n}" for i in range(model.config.n_layers)
                for n in HINTED.get(name, ())}
    assert hinted == expected
    for decay_filter, filtered in (("all", 1), ("nanogpt", 2)):
        groups = parameter_groups(model, 0.1, decay_filter, lr=3e-4)
        assert len(groups) == filtered + (name in HINTED)
        assert all("lr" not in g for g in groups[:filtered])
        covered = [names[id(p)] for g in groups for p in g["params"]]
        assert sorted(covered) == sorted(names.values())
        assert {names[id(p)] for g in groups[filtered:] for p in g["params"]} == expected
