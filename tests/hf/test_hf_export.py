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
    # max_length = the context, so that generate() and pipeline() without a length stop there
    assert json.loads((out / "generation_config.json").read_text())["max_length"] == 64
    # a class every supported transformers has (5.x would write its own TokenizersBackend)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "license:" in card
    assert f'from_pretrained("{out}")' in card and '"PATH"' not in card
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
    # for; without a length, generation stops at the context (the generation config's
    # max_length; transformers 5's pipeline would otherwise ask for 256 new tokens)
    with pytest.raises(ValueError, match="max_seq_len"):
        generator("The cat", max_new_tokens=64, do_sample=False)
    generator.model.generation_config.eos_token_id = None  # never stop early
    full = generator("The cat", do_sample=False, return_tensors=True)
    assert len(full[0]["generated_token_ids"]) == 64


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


def test_export_rejects_an_unknown_family(make_run, tmp_path, capsys):
    run_dir = make_run(tmp_path, "transformer")  # every registered family exports...
    assert export_run(run_dir, tmp_path / "hf-transformer").is_dir()
    spec = json.loads((run_dir / "model.json").read_text())  # ...a name gam lacks does not
    spec["model"] = "no-such-family"
    (run_dir / "model.json").write_text(json.dumps(spec))
    assert main([str(run_dir), str(tmp_path / "hf")]) == 1
    assert "no-such-family" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_card_names_the_data_its_license_and_the_runs_scores(make_run, tmp_path):
    run_dir = make_run(tmp_path, "gam-delta")
    config = json.loads((run_dir / "config.json").read_text())
    config["data"] = {"dataset": "wikitext2"}
    config["model_preset"] = "tiny"  # as gam train records the size preset
    (run_dir / "config.json").write_text(json.dumps(config))
    records = [{"kind": "eval", "step": s, "epoch": 1, "val_loss": 5.0 - s / 100,
                "val_ppl": 150.0 - s} for s in (10, 20)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    card = (export_run(run_dir, tmp_path / "hf") / "README.md").read_text()
    assert "datasets: [Salesforce/wikitext]" in card and "cc-by-sa-3.0" in card
    assert "`gam-delta`" in card and "130.00" in card and '"dataset": "wikitext2"' in card
    assert "GAM language model" not in card
    assert '"model_preset": "tiny"' in card


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


OTHER_PYTHON = os.environ.get("GAM_HF_OTHER_PYTHON")


@pytest.mark.skipif(not OTHER_PYTHON, reason="GAM_HF_OTHER_PYTHON (an interpreter with another "
                                             "transformers release; .ci/run sets it) is unset")
def test_exports_load_under_another_transformers_release(make_run, tmp_path):
    """An export written here loads (tokenizer and remote-code model) under the other release,
    and one written there loads here: e.g. 4.46.3 <-> 5.x, whose tokenizer classes differ."""
    ids_script = textwrap.dedent("""
        import sys, transformers
        folder = sys.argv[1]
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        print(transformers.__version__, tok("The cat sat").input_ids, tok.padding_side,
              type(model).__name__)
    """)
    here = export_run(make_run(tmp_path, "gam"), tmp_path / "hf-here")
    there = tmp_path / "hf-there"
    export_script = ("import sys; from gam.hf.export import main; "
                     "sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    subprocess.run([OTHER_PYTHON, "-c", export_script, str(make_run(tmp_path, "mamba")),
                    str(there)], check=True, env=env, timeout=300)
    for python, folder in ((OTHER_PYTHON, here), (sys.executable, there)):
        proc = subprocess.run([python, "-c", ids_script, str(folder)], capture_output=True,
                              text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().endswith("left GAMForCausalLM"), proc.stdout
    tok = transformers.AutoTokenizer.from_pretrained(here)
    line = subprocess.run([OTHER_PYTHON, "-c", ids_script, str(here)], capture_output=True,
                          text=True, env=env, timeout=300).stdout
    assert str(tok("The cat sat").input_ids) in line
