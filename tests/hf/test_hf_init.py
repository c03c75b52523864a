"""The Hugging Face model honours the library's initialisation settings: a model built with
``from_config`` / ``GAMForCausalLM(config)`` draws every parameter from the distribution
``gam.build_model`` draws it from, for every ``init`` scheme, tying and position std."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gam  # noqa: E402
from gam.hf import GAMForCausalLM, GAMHFConfig  # noqa: E402
from gam.models.lm import INIT_SCHEMES  # noqa: E402

SIZES = dict(vocab_size=300, max_seq_len=64, d_model=32, n_layers=2, num_memory_slots=64)
SETTINGS = [dict(init=init, tie_embeddings=tie) for init in INIT_SCHEMES for tie in (True, False)]
SETTINGS += [dict(init=init, pos_embedding_std=0.02) for init in INIT_SCHEMES]


def _stats(model: torch.nn.Module) -> dict[str, tuple[float, float, float]]:
    return {name: (p.float().mean().item(), p.float().std().item() if p.numel() > 1 else 0.0,
                   p.float().abs().max().item())
            for name, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("build", ["constructor", "from_config"])
def test_from_config_draws_the_library_distributions(settings, build):
    torch.manual_seed(0)
    library = gam.build_model("gam", "tiny", **SIZES, **settings)
    config = GAMHFConfig(**SIZES, **settings)
    torch.manual_seed(1)  # other numbers, same distributions
    if build == "constructor":
        hf = GAMForCausalLM(config)
    else:
        hf = transformers.AutoModelForCausalLM.from_config(config)
    assert (hf.gam.head.weight is hf.gam.token_embedding.weight) == config.tie_embeddings
    assert hf.config.tie_word_embeddings == config.tie_embeddings
    ours, theirs = _stats(library), _stats(hf.gam)
    assert ours.keys() == theirs.keys()
    for name, (mean, std, top) in ours.items():
        h_mean, h_std, h_top = theirs[name]
        numel = dict(library.named_parameters(remove_duplicate=False))[name].numel()
        if std == 0.0:  # constant tensors (norm weights, zero biases): identical
            assert (h_mean, h_std) == (mean, 0.0), name
        elif numel >= 500:  # large enough for a 10% check of the spread
            assert abs(h_std - std) <= 0.1 * std, (name, h_std, std)
            assert abs(h_mean - mean) <= 0.1 * std + 1e-3, (name, h_mean, mean)
        else:
            assert h_top <= 3 * top + 1e-6 and h_std <= 3 * std, (name, h_std, std)
    if settings.get("pos_embedding_std"):
        assert abs(hf.gam.pos_embedding.weight.std().item() - 0.02) < 0.002


def test_untied_export_round_trip(tmp_path):
    torch.manual_seed(0)
    hf = GAMForCausalLM(GAMHFConfig(**SIZES, tie_embeddings=False)).eval()
    assert hf.gam.head.weight is not hf.gam.token_embedding.weight
    hf.save_pretrained(tmp_path)
    back = GAMForCausalLM.from_pretrained(tmp_path).eval()
    assert back.gam.head.weight is not back.gam.token_embedding.weight
    for (name, a), b in zip(hf.gam.state_dict().items(), back.gam.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="contradicts"):
        GAMHFConfig(tie_embeddings=False, tie_word_embeddings=True)
