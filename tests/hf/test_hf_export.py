"""``gam export``: a hand-made run directory -> a Hugging Face folder usable offline."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gam  # noqa: E402
from gam.hf import GAMForCausalLM  # noqa: E402
from gam.hf.export import export_run, main  # noqa: E402


def test_export_loads_with_auto_classes_and_matches_the_run(run_dir, tmp_path):
    out = export_run(run_dir, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "configuration_gam.py",
            "modeling_gam.py"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model) is GAMForCausalLM
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert model.config.eos_token_id == model.generation_config.eos_token_id == eot
    assert model.generation_config.pad_token_id == eot
    # no max_length in the generation config: it would clash with generate(max_new_tokens=...);
    # the context travels as the config's max_seq_len and the tokenizer's model_max_length
    assert "max_length" not in json.loads((out / "generation_config.json").read_text())
    assert model.config.max_seq_len == 64
    assert tok.model_max_length == 64 and tok.padding_side == "left"
    text = "The cat sat on the mat."
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text  # byte-level BPE is lossless
    library = gam.load_pretrained(run_dir).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, library(ids)[0])


def test_pipeline_text_generation_offline(run_dir, tmp_path):
    out = export_run(run_dir, tmp_path / "hf")
    generator = transformers.pipeline("text-generation", model=str(out), device="cpu")
    result = generator("The cat", max_new_tokens=6, do_sample=False)
    assert isinstance(result[0]["generated_text"], str)
    assert result[0]["generated_text"].startswith("The cat")
    batch = generator(["A dog", "Memory slots hold"], max_new_tokens=4, do_sample=False,
                      batch_size=2)  # left-padded batch
    single = generator("A dog", max_new_tokens=4, do_sample=False)
    assert batch[0][0]["generated_text"] == single[0]["generated_text"]
    # past the model's context: a clear error, never tokens from positions it has no embedding
    # for (transformers 5's pipeline asks for 256 new tokens unless told otherwise)
    with pytest.raises(ValueError, match="max_seq_len"):
        generator("The cat", max_new_tokens=64, do_sample=False)


def test_exported_folder_loads_as_remote_code_without_importing_gam(run_dir, tmp_path):
    """What lm_eval --model hf does: AutoModelForCausalLM with trust_remote_code, in a fresh
    interpreter that never imported gam (the folder's entry points import it)."""
    out = export_run(run_dir, tmp_path / "hf")
    ids = [[5, 6, 7, 8]]
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoConfig, AutoModelForCausalLM
        assert "gam" not in sys.modules
        config = AutoConfig.from_pretrained({str(out)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        print(type(config).__name__, type(model).__name__)
        with torch.no_grad():
            print(model.eval()(torch.tensor({ids})).logits.sum().item())
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names, total = proc.stdout.split("\n")[:2]
    assert names == "GAMHFConfig GAMForCausalLM"
    with torch.no_grad():
        expected = gam.load_pretrained(run_dir).eval()(torch.tensor(ids))[0].sum().item()
    assert float(total) == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_plain_generate_of_an_export_warns_nothing(run_dir, tmp_path, hf_warnings):
    out = export_run(run_dir, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_warnings.clear()
    ids = torch.tensor([[5, 6, 7]])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert hf_warnings.messages() == []


def test_export_paper_tokenizer_special_tokens(make_run, tmp_path):
    run_dir = make_run(tmp_path, "gam-sum", kind="paper")
    out = export_run(run_dir, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "[SOS]", "[EOS]", "[PAD]", "[UNK]")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.gam_model_name == "gam-sum" and not model.config.use_gate
    assert model.generation_config.pad_token_id == tok.convert_tokens_to_ids("[PAD]")


def test_export_infers_the_tokenizer_kind_without_run_config(make_run, tmp_path):
    run_dir = make_run(tmp_path, "gam", kind="paper")
    (run_dir / "config.json").unlink()
    tok = transformers.AutoTokenizer.from_pretrained(export_run(run_dir, tmp_path / "hf"))
    assert tok.eos_token == "[EOS]"


def test_export_rejects_non_gam_models(make_run, tmp_path, capsys):
    run_dir = make_run(tmp_path, "transformer")
    with pytest.raises(ValueError, match="GAM models only"):
        export_run(run_dir, tmp_path / "hf")
    assert main([str(run_dir), str(tmp_path / "hf")]) == 1
    assert "GAM models only" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_cli_main(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main([str(run_dir), str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    assert main([str(run_dir), str(out)]) == 1  # refuses a non-empty folder
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(run_dir), str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "gam"
    assert main([str(run_dir), str(run_dir)]) == 1  # never writes into the run
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main([]) == 2  # usage error
    assert main(["--help"]) == 0


def test_export_reports_a_corrupted_checkpoint(make_run, tmp_path, capsys):
    run_dir = make_run(tmp_path)
    (run_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(gam.CheckpointError):
        export_run(run_dir, tmp_path / "hf")
    assert main([str(run_dir), str(tmp_path / "hf")]) == 1
    assert "corrupted" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_exported_files_follow_the_umask(run_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = export_run(run_dir, tmp_path / "hf")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for item in out.rglob("*"):
        assert item.stat().st_mode & 0o777 == (0o755 if item.is_dir() else 0o644), item.name


def test_export_gam_delta_run(make_run, tmp_path):
    run_dir = make_run(tmp_path, "gam-delta")
    out = export_run(run_dir, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.gam_model_name == "gam-delta"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gam.load_pretrained(run_dir).eval()(ids)[0])


def test_an_export_saved_before_the_init_setting_loads_as_it_was(make_run, tmp_path):
    """A config.json without init / tie_embeddings (written before they existed) describes a
    tied model with the official init: it must not load as today's untied default."""
    run_dir = make_run(tmp_path, "gam", init="paper")  # tied, as every model was then
    out = export_run(run_dir, tmp_path / "hf")
    path = out / "config.json"
    config = json.loads(path.read_text())
    for key in ("init", "tie_embeddings", "tie_word_embeddings", "pos_embedding_std"):
        config.pop(key, None)
    path.write_text(json.dumps(config))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.init == "paper" and model.config.tie_embeddings is True
    assert model.gam.head.weight is model.gam.token_embedding.weight
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gam.load_pretrained(run_dir).eval()(ids)[0])
