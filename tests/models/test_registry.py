"""build_model, presets, parameter counts, config validation and safetensors IO."""

import pytest
import torch

from gam import CheckpointError, build_model, count_parameters, load_pretrained, save_pretrained
from gam.models.gam import GAMConfig
from gam.models.registry import MODELS, PRESETS, model_config, recorded_config
from gam.models.transformer import TransformerConfig


def test_transformer_paper_size_within_one_percent_of_paper():
    with torch.device("meta"):
        model = build_model("transformer", "paper", init="paper")
    total = count_parameters(model)["total"]
    assert total == 24_166_400  # paper: 24.2M
    assert abs(total - 24.2e6) / 24.2e6 < 0.01


def test_count_parameters_non_embedding():
    model = build_model("gam", "tiny")
    counts = count_parameters(model)
    c = model.config
    assert counts["total"] - counts["non_embedding"] == (c.vocab_size + c.max_seq_len) * c.d_model


def test_cpu_small_preset_is_4_to_8_million_parameters():
    for name in ("gam", "transformer"):
        with torch.device("meta"):
            total = count_parameters(build_model(name, "cpu-small", init="paper"))["total"]
        assert 4e6 <= total <= 8e6, (name, total)


def test_every_registered_name_builds_tiny_and_runs():
    for name in MODELS:
        model = build_model(name, "tiny")
        logits, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8,
                                                                               dtype=torch.long))
        assert logits.shape == (1, 8, PRESETS["tiny"]["vocab_size"])
        assert torch.isfinite(loss)


def test_overrides_apply_and_unknown_names_are_rejected():
    cfg = model_config("gam", "tiny", num_memory_slots=7, max_seq_len=99)
    assert cfg.num_memory_slots == 7 and cfg.max_seq_len == 99
    with pytest.raises(ValueError, match="unknown model name 'gpt'"):
        build_model("gpt")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_model("gam", "huge")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['n_heads'\] for model 'gam'"):
        build_model("gam", "tiny", n_heads=3)


@pytest.mark.parametrize("cls, kwargs, match", [
    (GAMConfig, dict(conv_kernel_size=0), "conv_kernel_size must be an integer >= 1, got 0"),
    (GAMConfig, dict(num_memory_slots=0), "num_memory_slots must be an integer >= 1, got 0"),
    (GAMConfig, dict(use_local=False, use_global=False), "at least one path"),
    (GAMConfig, dict(d_model=-4), "d_model must be a positive integer, got -4"),
    (GAMConfig, dict(dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
    (TransformerConfig, dict(d_model=100, n_heads=8), "d_model 100 is not divisible by n_heads 8"),
    (TransformerConfig, dict(attention="flash3"), "attention must be one of"),
])
def test_invalid_configs_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_attention_dropout_defaults():
    assert TransformerConfig(attention="sdpa").effective_attn_dropout == 0.0
    assert TransformerConfig(attention="naive").effective_attn_dropout == 0.1
    assert TransformerConfig(attention="sdpa", attn_dropout=0.2).effective_attn_dropout == 0.2


def test_naive_and_sdpa_attention_agree():
    torch.manual_seed(0)
    a = build_model("transformer", "tiny").eval()
    b = build_model("transformer-naive", "tiny").eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=1e-5, rtol=1e-5)


def test_save_and_load_pretrained_round_trip_bit_exact(tmp_path):
    model = build_model("gam-sum", "tiny", init="paper").eval()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.model_name == "gam-sum"
    assert loaded.head.weight is loaded.token_embedding.weight
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_truncated_or_missing_checkpoint_is_a_clear_error(tmp_path):
    model = build_model("gam", "tiny")
    save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupted"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds no saved model"):
        load_pretrained(tmp_path / "nothing")


def test_checkpoint_of_another_shape_is_rejected(tmp_path):
    save_pretrained(build_model("gam", "tiny"), tmp_path)
    other = build_model("gam", "tiny", d_model=64)
    from gam.models.io import load_weights

    with pytest.raises(CheckpointError, match="does not match the model"):
        load_weights(other, tmp_path / "model.safetensors")


@pytest.mark.parametrize("name, exact", [("mamba", 20_510_720), ("mamba-paper", 20_504_576)])
def test_mamba_paper_size_within_one_percent_of_paper(name, exact):
    with torch.device("meta"):
        total = count_parameters(build_model(name, "paper", init="paper"))["total"]
    assert total == exact
    assert abs(total - 20.5e6) / 20.5e6 < 0.01


def test_recorded_config_fills_what_a_record_lacks():
    """A field a record lacks: the family's legacy value, else the name's variant setting,
    else the default; a field the code no longer has is an error."""
    made = model_config("transformer-naive", "tiny").to_dict()
    del made["attention"], made["final_norm"]
    config = recorded_config("transformer-naive", made)
    assert config.attention == "naive" and config.final_norm == "layernorm"
    made = model_config("s4d", "tiny").to_dict()
    assert recorded_config("s4d", made).ssm_lr == 1e-3
    del made["ssm_lr"], made["init"]
    assert recorded_config("s4d", made).ssm_lr is None
    assert recorded_config("s4d", made).init == "paper"
    with pytest.raises(ValueError, match="gone"):
        recorded_config("gam", {**model_config("gam", "tiny").to_dict(), "gone": 1})


def test_load_pretrained_fills_a_missing_field_with_the_names_variant_setting(tmp_path):
    """A saved model.json lacking a field (one added after it was saved) loads with its name's
    variant setting, as the bench's reuse check reads it, not the family's default."""
    import json

    model = build_model("gated-deltanet-matched", "tiny").eval()
    save_pretrained(model, tmp_path)
    record = json.loads((tmp_path / "model.json").read_text())
    config = record["config"]
    assert config.pop("mlp_ratio") != MODELS["gated-deltanet"].config_cls().mlp_ratio
    (tmp_path / "model.json").write_text(json.dumps(record))
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.config.mlp_ratio == model.config.mlp_ratio
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
