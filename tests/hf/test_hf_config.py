"""GAMHFConfig and the registration of the "gam" model type with the Auto classes."""

import subprocess
import sys
from dataclasses import fields

import pytest

transformers = pytest.importorskip("transformers")

import gam.hf  # noqa: E402
from gam.hf import GAMForCausalLM, GAMHFConfig, GAMModel  # noqa: E402
from gam.models.gam import GAMConfig  # noqa: E402
from gam.models.registry import MODELS  # noqa: E402


def test_auto_config_for_model_with_gam_and_hf_names():
    cfg = transformers.AutoConfig.for_model("gam", vocab_size=300, d_model=32, n_layers=2,
                                            num_memory_slots=16, max_seq_len=64)
    assert isinstance(cfg, GAMHFConfig) and cfg.model_type == "gam"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == (32, 2, 64)
    # the library's default init unties the head
    # (docs/results.md, "Fair initialisation: the default init")
    assert cfg.tie_word_embeddings is cfg.tie_embeddings is False
    assert transformers.AutoConfig.for_model("gam", init="paper").tie_word_embeddings is True
    aliased = transformers.AutoConfig.for_model("gam", hidden_size=48, num_hidden_layers=3,
                                                max_position_embeddings=128)
    assert (aliased.d_model, aliased.n_layers, aliased.max_seq_len) == (48, 3, 128)
    cfg.hidden_size = 64
    assert cfg.d_model == 64


def test_fields_and_defaults_are_the_library_ones():
    cfg = GAMHFConfig()
    assert cfg.to_gam_config() == GAMConfig()
    for f in fields(GAMConfig):  # the library's values, with its defaults resolved
        assert getattr(cfg, f.name) == getattr(GAMConfig(), f.name)
    gam_cfg = GAMConfig(vocab_size=77, d_model=24, n_layers=1, use_gate=False, conv_kernel_size=5)
    assert GAMHFConfig.from_gam_config(gam_cfg).to_gam_config() == gam_cfg


@pytest.mark.parametrize("flags,name", [
    (dict(), "gam"), (dict(use_gate=False), "gam-sum"),
    (dict(use_local=False, use_gate=False), "gam-global-only"),
    (dict(use_global=False, use_gate=False), "gam-local-only"),
    (dict(use_global=False), "gam"),  # no delta field given: not gam-delta-no-bank
    (dict(delta_heads=4, use_global=False), "gam-delta-no-bank"),
    (dict(use_delta_decay=False), "gam-delta-no-decay"),
    (dict(ffn_mult=2, delta_head_dim=96), "gam-delta-matched"),  # not its superset gam-delta
])
def test_variant_name(flags, name):
    assert GAMHFConfig(**flags).gam_model_name == name


@pytest.mark.parametrize("bad", [dict(d_model=0), dict(use_local=False, use_global=False),
                                 dict(conv_kernel_size=0), dict(init="xavier"),
                                 dict(tie_embeddings=False, tie_word_embeddings=True)])
def test_invalid_values_raise(bad):
    with pytest.raises(ValueError):
        GAMHFConfig(**bad)


def test_config_json_round_trip(tmp_path):
    cfg = GAMHFConfig(vocab_size=300, d_model=32, n_layers=2, use_gate=False, eos_token_id=1)
    cfg.save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, GAMHFConfig)
    assert back.to_gam_config() == cfg.to_gam_config() and back.eos_token_id == 1


def test_auto_model_classes_from_config():
    cfg = GAMHFConfig(vocab_size=300, d_model=32, n_layers=2, num_memory_slots=16,
                      max_seq_len=64, init="paper")
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    base = transformers.AutoModel.from_config(cfg)
    assert type(lm) is GAMForCausalLM and type(base) is GAMModel
    g = lm.gam
    assert g.token_embedding.weight is g.head.weight  # tied, as in the library
    # the library's initialisation, not HF's N(0, 0.02): nn.Linear's uniform head init
    bound = 1 / 32 ** 0.5
    assert g.head.weight.abs().max() <= bound and g.head.weight.std() > 0.3 * bound
    assert g.blocks[0].memory_bank.std() > 0 and g.pos_embedding.weight.std() > 0.5


def test_register_is_idempotent():
    gam.hf.register()
    gam.hf.register()
    assert transformers.AutoConfig.for_model("gam").__class__ is GAMHFConfig
    mapping = transformers.AutoModelForCausalLM._model_mapping
    assert mapping[GAMHFConfig] is GAMForCausalLM
    assert transformers.AutoModel._model_mapping[GAMHFConfig] is GAMModel


def test_import_gam_works_without_transformers():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # makes `import transformers` fail\n"
        "import gam\n"
        "assert 'gam.hf' not in sys.modules\n"
        "try:\n"
        "    import gam.hf\n"
        "except ImportError as e:\n"
        "    assert 'gam[hf]' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('gam.hf imported without transformers')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_gam_delta_config_fields_and_round_trip(tmp_path):
    from gam.models.gam import GAMDeltaConfig

    cfg = GAMHFConfig(gam_model_name="gam-delta", d_model=32, n_layers=2, delta_heads=2)
    assert cfg.to_gam_config() == GAMDeltaConfig(d_model=32, n_layers=2, delta_heads=2)
    cfg.save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert back.gam_model_name == "gam-delta" and back.to_gam_config() == cfg.to_gam_config()
    # a delta field without a name selects the family; a plain GAM config has no such field
    assert GAMHFConfig(delta_heads=2, d_model=32).gam_model_name == "gam-delta"
    assert not hasattr(GAMHFConfig(), "delta_heads")
    with pytest.raises(ValueError, match="gam_model_name"):
        GAMHFConfig(gam_model_name="no-such-family")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_family_has_a_config(name, tmp_path):
    """Every registry name (families added later included) round-trips through config.json
    with exactly its config class's fields."""
    cfg = GAMHFConfig(gam_model_name=name, d_model=32, n_layers=2)
    assert type(cfg.to_gam_config()) is MODELS[name].config_cls
    cfg.save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert back.gam_model_name == name and back.to_gam_config() == cfg.to_gam_config()


def test_tie_embeddings_is_one_attribute_with_tie_word_embeddings():
    cfg = GAMHFConfig(init="paper")
    assert cfg.tie_embeddings is cfg.tie_word_embeddings is True
    cfg.tie_word_embeddings = False  # what transformers' own code and users set
    assert cfg.tie_embeddings is False and cfg.to_gam_config().tie_embeddings is False
    cfg.tie_embeddings = True
    assert cfg.tie_word_embeddings is True
    saved = cfg.to_dict()
    assert saved["tie_word_embeddings"] is True and "tie_embeddings" not in saved
    assert GAMHFConfig(**{**saved, "tie_word_embeddings": False}).tie_embeddings is False
