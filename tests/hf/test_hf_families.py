"""Every registered family (``gam.models.registry.MODELS``, families added later included)
through the Hugging Face wrapper: exact logits, left padding, generation, export, remote code
in a fresh interpreter, and a re-saved (fine-tuned) copy that still loads as remote code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gam.hf import GAMForCausalLM, output_cache  # noqa: E402
from gam.hf.configuration_gam import REMOTE_CODE  # noqa: E402
from gam.hf.export import export_run  # noqa: E402
from gam.models.registry import MODELS  # noqa: E402

FAMILIES = sorted(MODELS)
ROWS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]


def _left_pad(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _fresh_python(script: str, tmp_path, timeout: int = 300) -> str:
    """Run ``script`` in a new interpreter that has not imported gam (offline); its stdout."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_the_library_model(make_lm, name, tmp_path):
    lm = make_lm(name)
    hf = GAMForCausalLM.from_gam(lm).eval()
    assert hf.config.gam_model_name == name
    idx = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm(idx)[0]
        assert torch.equal(hf(idx, use_cache=False).logits, ref)
        assert torch.equal(hf(idx).logits, ref)  # through the blocks' prefill
    hf.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(idx).logits, ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padding_gives_each_row_what_it_gives_alone(make_lm, name):
    hf = GAMForCausalLM.from_gam(make_lm(name), pad_token_id=0, eos_token_id=1).eval()
    ids, mask = _left_pad(ROWS)
    width = ids.shape[1]
    with torch.no_grad():
        cached = hf(ids, attention_mask=mask).logits
        uncached = hf(ids, attention_mask=mask, use_cache=False).logits
        for i, row in enumerate(ROWS):
            alone = hf(torch.tensor([row])).logits[0]
            torch.testing.assert_close(cached[i, width - len(row):], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(uncached[i, width - len(row):], alone, rtol=1e-5,
                                       atol=1e-5)
    greedy = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy, hf.generate(ids, attention_mask=mask, max_new_tokens=6,
                                           do_sample=False, use_cache=False))
    beams = dict(max_new_tokens=5, num_beams=3, do_sample=False, length_penalty=0.0)
    beam = hf.generate(ids, attention_mask=mask, **beams)
    for i, row in enumerate(ROWS):
        alone = hf.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False)
        assert torch.equal(greedy[i, width:], alone[0, len(row):])
        assert torch.equal(beam[i, width:], hf.generate(torch.tensor([row]), **beams)[0, len(row):])


@pytest.mark.parametrize("name", ["gam", "transformer"])
def test_padding_that_no_family_can_honour_is_refused(make_lm, name):
    hf = GAMForCausalLM.from_gam(make_lm(name), pad_token_id=0).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), pytest.raises(ValueError, match="between real tokens"):
        hf(ids, attention_mask=torch.tensor([[1, 0, 1, 1]]))
        # right padding is fine without a cache, but a cache that ends in it cannot continue
    with torch.no_grad():
        out = hf(ids, attention_mask=torch.tensor([[1, 1, 1, 0]]), use_cache=True)
        torch.testing.assert_close(out.logits[0, :3], hf(ids[:, :3]).logits[0])
        with pytest.raises(ValueError, match="right padding"):
            hf(torch.tensor([[9]]), past_key_values=output_cache(out))


def test_every_family_exports_and_loads_as_remote_code_in_a_fresh_interpreter(make_run,
                                                                               tmp_path):
    """What ``lm_eval --model hf ... trust_remote_code=True`` does, for every family."""
    import gam

    ids = [[5, 6, 7, 8, 9]]
    expected, folders = {}, {}
    for name in FAMILIES:
        run = make_run(tmp_path, name)
        folders[name] = str(export_run(run, tmp_path / f"hf-{name}"))
        with torch.no_grad():
            expected[name] = gam.load_pretrained(run).eval()(torch.tensor(ids))[0]
    out = _fresh_python(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert "gam" not in sys.modules
        result = {{}}
        for name, folder in {folders!r}.items():
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            AutoTokenizer.from_pretrained(folder)  # no remote code, no question asked
            with torch.no_grad():
                result[name] = model(torch.tensor({ids})).logits.tolist()
        print(json.dumps(result))
    """, tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert sorted(result) == FAMILIES
    for name in FAMILIES:  # (another process: other thread counts, so not bit for bit)
        torch.testing.assert_close(torch.tensor(result[name]), expected[name], rtol=1e-5,
                                   atol=1e-5, msg=name)


def test_a_resaved_model_keeps_its_code(run_dir, tmp_path):
    """Loaded from an export (as remote code, or through gam.hf), then saved again: the folder
    holds the entry points (not the package's source) and loads as remote code."""
    out = export_run(run_dir, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "resaved-gam-hf")
    _fresh_python(f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        model.save_pretrained({str(tmp_path / "resaved-remote")!r})
    """, tmp_path)
    ids = [[5, 6, 7]]
    for folder in ("resaved-gam-hf", "resaved-remote"):
        path = tmp_path / folder
        for filename, source in REMOTE_CODE.items():
            assert (path / filename).read_text() == source, (folder, filename)
        auto_map = json.loads((path / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForCausalLM"] == "modeling_gam.GAMForCausalLM"
        total = _fresh_python(f"""
            import torch
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
            with torch.no_grad():
                print(model.eval()(torch.tensor({ids})).logits.sum().item())
        """, tmp_path)
        with torch.no_grad():
            expected = model.eval()(torch.tensor(ids)).logits.sum().item()
        assert float(total) == pytest.approx(expected, rel=1e-6, abs=1e-5)


def test_trainer_fine_tunes_an_export_and_saves_a_loadable_folder(run_dir, tmp_path):
    """A short transformers.Trainer run on a remote-code model, then save_model: the folder
    loads in a fresh interpreter with trust_remote_code and gives the fine-tuned logits."""
    pytest.importorskip("accelerate")
    out = export_run(run_dir, tmp_path / "hf")
    trained = tmp_path / "trained"
    ids = [[5, 6, 7, 8]]
    logits = _fresh_python(f"""
        import torch
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        rows = [{{"input_ids": torch.tensor(r), "labels": torch.tensor(r)}}
                for r in [[5, 6, 7, 8, 9, 10]] * 8]
        args = TrainingArguments({str(tmp_path / "trainer")!r}, max_steps=3,
                                 per_device_train_batch_size=4, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="no")
        Trainer(model=model, args=args, train_dataset=rows).train()
        Trainer(model=model, args=args).save_model({str(trained)!r})
        with torch.no_grad():
            print(model.eval()(torch.tensor({ids})).logits.sum().item())
    """, tmp_path, timeout=600)
    again = _fresh_python(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(trained)!r}, trust_remote_code=True)
        with torch.no_grad():
            print(model.eval()(torch.tensor({ids})).logits.sum().item())
    """, tmp_path)
    assert float(again) == pytest.approx(float(logits.strip().splitlines()[-1]), rel=1e-6,
                                         abs=1e-5)
    with torch.no_grad():
        before = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(
            torch.tensor(ids)).logits.sum().item()
    assert float(again) != before  # it did train
