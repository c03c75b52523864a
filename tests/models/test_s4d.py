"""The S4D family (``gam.models.s4d``): cached decoding == forward in float64, greedy cached ==
uncached, causality, the paper-size parameter count, init, optimizer flags and groups (the S4
papers' ssm_lr), bf16 autocast, the decode state's bytes, config errors, and
``gam train / eval / generate --model s4d``."""

import json
import math

import pytest
import torch

from gam import build_model, count_parameters
from gam.models.blocks import block_decode_state_bytes, block_mixing_flops
from gam.models.ops.s4d_kernel import fft_conv_flops
from gam.models.registry import model_config
from gam.models.s4d import S4DLM
from gam.training.optim import parameter_groups

GAM_PAPER_PARAMETERS = 22_599_680


def _model(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    model = build_model("s4d", "tiny", **overrides).to(dtype)
    with torch.no_grad():  # make every parameter matter (biases start at zero)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("a_init", ["lin", "inv"])
@pytest.mark.parametrize("prompt_len", [1, 23])
def test_cached_decoding_equals_forward_float64(a_init, prompt_len):
    model = _model(a_init=a_init)
    T = 45  # not a power of two
    idx = torch.randint(0, model.config.vocab_size, (2, T))
    with torch.no_grad():
        full, _ = model(idx)  # (B, T, V)
        logits, cache = model.prefill(idx[:, :prompt_len])
        assert cache.layers[0].dtype == torch.complex128
        torch.testing.assert_close(logits, full[:, prompt_len - 1], rtol=0, atol=1e-10)
        for t in range(prompt_len, T):
            logits, cache = model.step(idx[:, t], cache)
            torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-10)


def test_greedy_cached_generation_equals_uncached():
    model = _model(torch.float32)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    out = model.generate(prompt, 12, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq)[0][:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_future_tokens_do_not_change_past_logits():
    model = _model()
    idx = torch.randint(0, model.config.vocab_size, (2, 40))
    changed = idx.clone()
    changed[:, 25:] = torch.randint(0, model.config.vocab_size, (2, 15))
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=1e-12)
    assert (a[:, 25:] - b[:, 25:]).abs().max() > 1e-3  # and the later ones do change


def test_paper_size_is_gams_within_five_percent():
    with torch.device("meta"):
        model = build_model("s4d", "paper", init="paper")
    c = model.config
    total = count_parameters(model)["total"]
    assert (c.d_model, c.n_layers, c.state_size, c.ffn_mult) == (512, 6, 256, 4)
    assert model.pos_embedding is None and c.tie_embeddings
    assert total == 22_462_464
    assert abs(total - GAM_PAPER_PARAMETERS) / GAM_PAPER_PARAMETERS < 0.05
    d, modes = 512, 128
    ssm = d * (2 + 4 * modes)  # log_dt, D; log_A_real, A_imag, C (2 reals)
    block = 2 * 2 * d + ssm + (d * 2 * d + 2 * d) + (d * 4 * d + 4 * d + 4 * d * d + d)
    assert total == 10_000 * d + 6 * block + 2 * d


def test_init_and_optimizer_flags():
    torch.manual_seed(0)
    model = build_model("s4d", "tiny", d_model=64, state_size=64)
    layer = model.blocks[0].ssm
    assert torch.equal(layer.log_A_real, torch.full((64, 32), math.log(0.5)))
    torch.testing.assert_close(layer.A_imag[5], math.pi * torch.arange(32.0))
    dt = torch.exp(layer.log_dt)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert abs(layer.C.var().item() - 0.5) < 0.1 and abs(layer.D.var().item() - 1) < 0.5
    inv = build_model("s4d", "tiny", a_init="inv", state_size=32).blocks[0].ssm.A_imag
    assert inv[0, 0].item() == pytest.approx(32 / math.pi * 31)  # N/pi (N/(2n+1) - 1), n = 0
    # without ssm_lr the SSM parameters are flagged for the nanogpt filter only, as before
    plain = build_model("s4d", "tiny", d_model=64, state_size=64, ssm_lr=None)
    groups = parameter_groups(plain, 0.1, "nanogpt")
    assert len(groups) == 2
    no_decay = {id(p) for p in groups[1]["params"]}
    for block in plain.blocks:
        for p in (block.ssm.log_dt, block.ssm.log_A_real, block.ssm.A_imag):
            assert id(p) in no_decay
        assert id(block.ssm.C) not in no_decay  # C is decayed, as in the S4 papers
    # init_weights re-draws the family parameters in every scheme
    with torch.no_grad():
        layer.A_imag.fill_(3.0)
    model.init_weights()
    torch.testing.assert_close(layer.A_imag[0], math.pi * torch.arange(32.0))


@pytest.mark.parametrize("decay_filter", ["all", "nanogpt"])
@pytest.mark.parametrize("lr, peak", [(3e-3, 1e-3), (4e-4, 4e-4)])
def test_ssm_parameters_get_their_own_optimizer_group(decay_filter, lr, peak):
    """The S4 recipe: log_A_real, A_imag and log_dt at peak min(lr, ssm_lr), no weight decay,
    whatever the decay filter; C, D and the rest as before."""
    model = build_model("s4d", "tiny")
    assert model.config.ssm_lr == 1e-3 and model.config.to_dict()["ssm_lr"] == 1e-3
    groups = parameter_groups(model, 0.1, decay_filter, lr)
    *filtered, ssm = groups
    assert len(filtered) == (1 if decay_filter == "all" else 2)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    expected = {id(getattr(b.ssm, name)) for b in model.blocks
                for name in ("log_dt", "log_A_real", "A_imag")}
    assert ids(ssm) == expected and len(ssm["params"]) == 3 * model.config.n_layers
    assert ssm["weight_decay"] == 0.0 and ssm["lr"] == peak
    assert all("lr" not in g for g in filtered)  # the run's lr and schedule
    assert filtered[0]["weight_decay"] == 0.1
    rest = set().union(*(ids(g) for g in filtered))
    assert not rest & expected and len(rest | expected) == len(list(model.parameters()))
    assert {id(model.blocks[0].ssm.C), id(model.blocks[0].ssm.D)} <= rest
    assert len(parameter_groups(build_model("s4d", "tiny", ssm_lr=5e-4), 0.1, decay_filter,
                                lr)[-1]["params"]) == 3 * model.config.n_layers
    with pytest.raises(ValueError, match="needs the run's lr"):
        parameter_groups(model, 0.1, decay_filter)


def test_block_interface_numbers():
    model = build_model("s4d", "tiny").eval()
    c = model.config
    block = model.blocks[0]
    assert model.receptive_field == c.max_seq_len
    assert block_mixing_flops(block, 64) == {"ssm": fft_conv_flops(64, c.d_model)}
    assert block_mixing_flops(block, 64, causal_halved=True) == block_mixing_flops(block, 64)
    _, cache = model.prefill(torch.randint(0, c.vocab_size, (3, 7)))
    # complex64 state: 8 bytes per mode, one mode per conjugate pair
    assert block_decode_state_bytes(block, cache.layers[0]) == 3 * c.d_model * (
        c.state_size // 2) * 8
    assert cache.layers[0].dtype == torch.complex64


def test_bf16_autocast_trains_and_matches_fp32():
    torch.manual_seed(0)
    model = build_model("s4d", "tiny")
    idx = torch.randint(0, 256, (4, 33))
    _, fp32 = model(idx[:, :-1], idx[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
    loss.backward()
    assert abs(loss.item() - fp32.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_bf16_weights_without_autocast_decode():
    model = build_model("s4d", "tiny").to(torch.bfloat16).eval()
    out = model.generate(torch.randint(0, 256, (2, 4)), 3, temperature=0)
    assert out.shape == (2, 7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(state_size=7), "state_size must be an even integer"),
    (dict(state_size=0), "state_size must be an even integer"),
    (dict(a_init="legs"), "a_init must be one of"),
    (dict(dt_min=0.1, dt_max=0.01), "dt_min and dt_max"),
    (dict(ssm_lr=0.0), "ssm_lr must be a positive number"),
    (dict(ssm_lr="1e-3"), "ssm_lr must be a positive number"),
    (dict(ssm_lr=True), "ssm_lr must be a positive number"),
    (dict(ssm_lr=float("inf")), "ssm_lr must be a positive number"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_config("s4d", "tiny", **kwargs)


def test_cli_train_eval_generate(tmp_path, data_dir, private_gam_environment, capsys):
    from gam.cli import main

    with private_gam_environment(tmp_path / "cache"):
        out = tmp_path / "run"
        args = ["train", "--model", "s4d", "--preset", "tiny", "--dataset", "wikitext2",
                "--max-train-rows", "300", "--max-val-rows", "30", "--vocab-size", "400",
                "--batch-size", "8", "--quiet", "--threads", "1", "--device", "cpu",
                "--max-steps", "3", "--dtype", "bf16", "--data-dir", str(data_dir),
                "--out", str(out)]
        assert main(args) == 0
        capsys.readouterr()
        assert main(["eval", str(out)]) == 0
        assert math.isfinite(json.loads(capsys.readouterr().out)["loss"])
        assert main(["generate", str(out), "--prompt", "The", "--max-new-tokens", "5",
                     "--temperature", "0", "--ignore-eos"]) == 0
        assert capsys.readouterr().out.startswith("The")


def test_registered_as_s4d():
    model = build_model("s4d", "tiny")
    assert isinstance(model, S4DLM) and model.model_name == "s4d"
    assert model_config("s4d", "cpu-small").state_size == 256
