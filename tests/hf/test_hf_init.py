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
    _assert_same_distributions(library, hf.gam)
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


def _assert_same_distributions(library, hf_lm, names=None):
    """Every parameter of ``hf_lm`` (or those in ``names``) has the spread of ``library``'s."""
    ours, theirs = _stats(library), _stats(hf_lm)
    assert ours.keys() == theirs.keys()
    sizes = {n: p.numel() for n, p in library.named_parameters(remove_duplicate=False)}
    for name, (mean, std, top) in ours.items():
        if names is not None and name not in names:
            continue
        h_mean, h_std, h_top = theirs[name]
        if std == 0.0:  # constant tensors (norm weights, zero biases): identical
            assert (h_mean, h_std) == (mean, 0.0), name
        elif sizes[name] >= 500:  # large enough for a 10% check of the spread
            assert abs(h_std - std) <= 0.1 * std, (name, h_std, std)
            assert abs(h_mean - mean) <= 0.1 * std + 1e-3, (name, h_mean, mean)
        else:
            assert h_top <= 3 * top + 1e-6 and h_std <= 3 * std, (name, h_std, std)


@pytest.mark.parametrize("settings", [dict(init="paper"), dict(init="untied"),
                                      dict(init="gpt2", tie_embeddings=False)],
                         ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("name", ["gam", "gam-delta"])
def test_weights_missing_from_a_checkpoint_get_the_library_init(tmp_path, name, settings):
    """A checkpoint without some weights (a whole block, the final norm, half of a Linear):
    those come out with the library's distributions, finite, and every weight the file holds
    loads exactly (transformers 5 initialises module by module; it used to leave them as
    uninitialised memory, NaN)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    sizes = {**SIZES, "num_memory_slots": 128}
    library = gam.build_model(name, "tiny", **sizes, **settings)
    GAMForCausalLM.from_gam(library).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    missing = {k for k in tensors if ".blocks.1." in k or ".ln_f." in k
               or k.endswith("blocks.0.gate.weight")}
    save_file({k: v for k, v in tensors.items() if k not in missing}, path,
              metadata={"format": "pt"})
    torch.manual_seed(1)
    back = GAMForCausalLM.from_pretrained(tmp_path)
    prefix = "model.gam."
    missing_names = {k[len(prefix):] for k in missing}
    for pname, p in back.gam.named_parameters(remove_duplicate=False):
        assert torch.isfinite(p).all(), pname
        if pname not in missing_names:
            assert torch.equal(p, dict(library.named_parameters(remove_duplicate=False))[pname]), \
                pname
    assert torch.equal(back.gam.blocks[0].gate.bias, library.blocks[0].gate.bias)
    _assert_same_distributions(library, back.gam, missing_names)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("drop", ["embedding", "head", "both"])
def test_missing_embedding_or_head_is_filled_and_named(tmp_path, tie, drop):
    """The one stored copy of a tied embedding, or an untied head / embedding, missing from the
    file: filled per the config (tied stays tied), never left on the meta device, and named in
    the loading info, on every supported transformers."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    library = gam.build_model("gam", "tiny", **SIZES, init="paper", tie_embeddings=tie)
    GAMForCausalLM.from_gam(library).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    names = {"embedding": ["model.gam.token_embedding.weight"],
             "head": ["model.gam.head.weight"],
             "both": ["model.gam.token_embedding.weight", "model.gam.head.weight"]}[drop]
    save_file({k: v for k, v in tensors.items() if k not in names}, path,
              metadata={"format": "pt"})
    back, info = GAMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    lm = back.gam
    for pname, p in back.named_parameters(remove_duplicate=False):
        assert not p.is_meta and torch.isfinite(p).all(), pname
    assert (lm.head.weight is lm.token_embedding.weight) == tie
    stored = [n for n in names if n in tensors]  # a tied file never holds the head
    if stored:
        assert set(stored) <= set(info["missing_keys"])
    elif not tie:
        raise AssertionError("an untied file holds both")
    weight = lm.token_embedding.weight if drop != "head" else lm.head.weight
    if stored:  # drawn per the config: tied, the head's U(+-1/sqrt(d)); untied embedding N(0, 1)
        want = library.token_embedding.weight if drop != "head" else library.head.weight
        assert abs(weight.std().item() - want.std().item()) < 0.1 * want.std().item()
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(back(x).logits).all()


def test_a_weight_left_on_the_meta_device_is_filled_and_named():
    """The safety net behind every loader: what a loader left on meta is filled and named."""
    torch.manual_seed(0)
    hf = GAMForCausalLM(GAMHFConfig(**SIZES, init="paper", tie_embeddings=True))
    block = hf.gam.blocks[1]
    block.ffn.fc1.weight = torch.nn.Parameter(torch.empty_like(block.ffn.fc1.weight,
                                                               device="meta"))
    hf.gam.token_embedding.weight = torch.nn.Parameter(
        torch.empty_like(hf.gam.token_embedding.weight, device="meta"))
    missing: set[str] = set()
    hf._fill_meta_weights(missing)  # what tie_weights runs after the base class's tying
    assert missing == {"model.gam.blocks.1.ffn.fc1.weight", "model.gam.token_embedding.weight"}
    assert not any(p.is_meta for p in hf.parameters())
    assert hf.gam.head.weight is hf.gam.token_embedding.weight
    assert 0.05 < hf.gam.token_embedding.weight.std().item() < 0.15  # the tied head's init
