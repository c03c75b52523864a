"""The ``gam`` command line: data resolution, clear one-line errors, eval / generate on a trained
tiny run, forwarding of ``gam bench`` / ``gam export``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gam.cli import main, stream_text
from gam.training import find_checkpoint, read_metrics
from gam.training.argtypes import parse_model_arg


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory, private_gam_environment):
    with private_gam_environment(tmp_path_factory.mktemp("gam-cache")) as cache:
        yield cache


def train_args(out: Path, *extra: str, data_dir: Path | None = None) -> list[str]:
    args = ["train", "--model", "gam", "--preset", "tiny", "--dataset", "wikitext2",
            "--max-train-rows", "300", "--max-val-rows", "30", "--vocab-size", "400",
            "--batch-size", "8", "--quiet", "--threads", "1", "--device", "cpu",
            "--out", str(out)]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return args + list(extra)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("cli-runs") / "run"
    assert main(train_args(out, "--max-steps", "4", "--save-every", "2",
                           data_dir=data_dir)) == 0
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------ entry point
def test_python_m_gam_help():
    res = subprocess.run([sys.executable, "-m", "gam", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0
    for command in ("train", "eval", "generate", "bench", "export"):
        assert command in res.stdout


def test_train_help_documents_the_recipe_and_decay_filters(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--decay-filter", "nanogpt", "--no-decay-norms-biases-embeddings", "EVERY",
                 "--resume", "--model-arg", "torchrun"):
        assert text in out


def test_parse_model_arg():
    assert parse_model_arg("num_memory_slots=128") == ("num_memory_slots", 128)
    assert parse_model_arg("dropout=0.2") == ("dropout", 0.2)
    assert parse_model_arg("use_gate=false") == ("use_gate", False)
    assert parse_model_arg("attn_dropout=none") == ("attn_dropout", None)
    assert parse_model_arg("attention=naive") == ("attention", "naive")


# --------------------------------------------------------------------------- data location
def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    code = main(train_args(tmp_path / "out", "--max-steps", "1", data_dir=tmp_path / "nowhere"))
    assert code == 2
    err = error_of(capsys)
    assert err.startswith("gam: error: corpus 'wikitext2'")
    assert len(err.strip().splitlines()) == 1 and "nowhere" in err
    assert not (tmp_path / "out").exists()


def test_wrongly_laid_out_data_dir_names_the_missing_files(tmp_path, capsys):
    folder = tmp_path / "data" / "wikitext-2-raw"
    folder.mkdir(parents=True)
    (folder / "wiki.train.raw").write_text(" = A = \n")
    code = main(train_args(tmp_path / "out", data_dir=tmp_path / "data"))
    assert code == 2
    err = error_of(capsys)
    assert "wiki.valid.raw" in err and "wiki.test.raw" in err


def test_data_dir_from_the_environment(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("GAM_DATA_DIR", str(data_dir))
    out = tmp_path / "env-run"
    assert main(train_args(out, "--max-steps", "1", "--no-use-hub")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["data_dir"] is None
    assert str(data_dir) in config["data"]["corpus_source"]

    monkeypatch.setenv("GAM_DATA_DIR", str(tmp_path / "empty"))
    assert main(train_args(tmp_path / "env-run2", "--offline")) == 2  # the former name
    assert "GAM_DATA_DIR" in error_of(capsys)


def test_relative_data_dir_is_recorded_absolute(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(data_dir.parent.parent)  # <root>, where shared/data lives
    out = tmp_path / "rel"
    assert main(train_args(out, "--max-steps", "1", data_dir=Path("shared/data"))) == 0
    recorded = json.loads((out / "config.json").read_text())["data"]["data_dir"]
    assert Path(recorded).is_absolute() and Path(recorded).resolve() == data_dir.resolve()


# --------------------------------------------------------------------------- bad corpora
def test_empty_text_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = train_args(tmp_path / "out")
    args[args.index("wikitext2")] = f"text:{empty}"
    assert main(args) == 2
    assert "empty" in error_of(capsys)


def test_corpus_smaller_than_one_block(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("a few words\nof text\nhere\n")
    args = train_args(tmp_path / "out", "--vocab-size", "300")
    args[args.index("wikitext2")] = f"text:{small}"
    assert main(args) == 2
    assert "fewer than one block" in error_of(capsys)


def test_corpus_smaller_than_one_batch(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of a small corpus with some words\n" for i in range(60)))
    args = train_args(tmp_path / "out", "--vocab-size", "300", "--batch-size", "64")
    args[args.index("wikitext2")] = f"text:{text}"
    assert main(args) == 2
    assert "fewer than one batch" in error_of(capsys)


def test_unknown_corpus(tmp_path, capsys):
    args = train_args(tmp_path / "out")
    args[args.index("wikitext2")] = "wikitext103"
    assert main(args) == 2
    err = error_of(capsys)
    assert err.startswith("gam: error: unknown corpus 'wikitext103'")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--model", "gpt5"), ("--preset", "huge")])
def test_unknown_model_or_preset(tmp_path, capsys, flag, value):
    args = train_args(tmp_path / "out")
    args[args.index(flag) + 1] = value
    assert main(args) == 2
    assert "invalid choice" in error_of(capsys)


def test_unknown_model_arg(tmp_path, data_dir, capsys):
    code = main(train_args(tmp_path / "out", "--model-arg", "num_slots=3", data_dir=data_dir))
    assert code == 2
    assert "unknown setting" in error_of(capsys)


def test_model_arg_reaches_the_model(tmp_path, data_dir):
    out = tmp_path / "slots"
    assert main(train_args(out, "--max-steps", "1", "--model-arg", "num_memory_slots=8",
                           "--no-decay-norms-biases-embeddings", data_dir=data_dir)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["decay_filter"] == "nanogpt"
    assert config["model_config"]["num_memory_slots"] == 8
    assert config["model_arg"] == {"num_memory_slots": 8}


# --------------------------------------------------------------------------- bad numbers
@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "batch_size"), ("--batch-size", "-4", "batch_size"),
    ("--lr", "0", "lr"), ("--lr", "-0.1", "lr"), ("--lr", "nan", "lr"),
    ("--epochs", "0", "epochs"), ("--max-steps", "0", "max_steps"),
    ("--grad-accum", "0", "grad_accum"), ("--save-every", "0", "save_every"),
    ("--dropout", "1.5", "dropout"),
])
def test_bad_numbers(tmp_path, capsys, flag, value, message):
    assert main(train_args(tmp_path / "out", flag, value)) == 2
    err = error_of(capsys)
    assert err.startswith("gam: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_seq_len_above_max_seq_len(tmp_path, data_dir, capsys):
    assert main(train_args(tmp_path / "out", "--seq-len", "65", data_dir=data_dir)) == 2
    assert "exceeds the model's max_seq_len 64" in error_of(capsys)


def test_batch_not_divisible_by_grad_accum(tmp_path, data_dir, capsys):
    assert main(train_args(tmp_path / "out", "--grad-accum", "3", data_dir=data_dir)) == 2
    assert "not divisible by --grad-accum 3" in error_of(capsys)


def test_fp16_needs_cuda(tmp_path, data_dir, capsys):
    assert main(train_args(tmp_path / "out", "--dtype", "fp16", "--device", "cpu",
                           data_dir=data_dir)) == 2
    assert "fp16 needs a CUDA device" in error_of(capsys)


def test_optional_loggers_must_be_installed(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(train_args(tmp_path / "out", "--wandb", data_dir=data_dir)) == 2
    assert "needs the wandb package" in error_of(capsys)


def test_out_dir_holding_a_run_is_refused(run_dir, data_dir, capsys):
    assert main(train_args(run_dir, "--max-steps", "1", data_dir=data_dir)) == 2
    assert "already holds a run" in error_of(capsys)


# -------------------------------------------------------------------------------- resume
def test_resume_on_a_directory_without_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no training run" in error_of(capsys)
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in error_of(capsys)


def test_resume_refuses_changed_settings(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir), "--device", "cpu", "--lr", "1e-3"]) == 2
    assert "--lr" in error_of(capsys)


def test_resume_with_a_truncated_checkpoint_names_the_file(run_copy, capsys):
    weights = find_checkpoint(run_copy) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    assert main(["train", "--resume", str(run_copy), "--device", "cpu", "--quiet"]) == 2
    err = error_of(capsys)
    assert str(weights) in err and "truncated or corrupted" in err


# ----------------------------------------------------------------------- eval and generate
def test_eval_prints_token_weighted_json(run_dir, capsys):
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    final = read_metrics(run_dir, kind="eval")[-1]
    assert result["split"] == "valid"
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert result["tokens"] == final["val_tokens"]
    assert result["ppl"] == pytest.approx(2.718281828459045 ** result["loss"], rel=1e-9)

    assert main(["eval", str(run_dir), "--device", "cpu", "--split", "test"]) == 0
    test = json.loads(capsys.readouterr().out)
    assert test["split"] == "test" and test["tokens"] > 0


def test_eval_unknown_split(run_dir, capsys):
    assert main(["eval", str(run_dir), "--device", "cpu", "--split", "train2"]) == 2
    assert "no 'train2' split" in error_of(capsys)


def test_eval_with_truncated_weights_names_the_file(run_copy, capsys):
    weights = run_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", str(run_copy), "--device", "cpu"]) == 2
    err = error_of(capsys)
    assert err.startswith("gam: error:") and str(weights) in err
    assert main(["generate", str(run_copy), "--device", "cpu", "--prompt", "x"]) == 2
    assert str(weights) in error_of(capsys)


def test_vocab_mismatch_between_model_and_tokenizer(run_copy, tmp_path, capsys):
    from gam.data import load_corpus, train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("".join(f"word{i} other{i * 7} thing{i % 13}\n" for i in range(3000)))
    big = train_tokenizer(load_corpus(f"text:{text}"), vocab_size=900, cache_dir=tmp_path)
    assert big.get_vocab_size() > 400
    big.save(str(run_copy / "tokenizer.json"))
    assert main(["eval", str(run_copy), "--device", "cpu"]) == 2
    err = error_of(capsys)
    assert "is not this run's tokenizer" in err and "tokenizer.json" in err
    # a run made before tokenizer hashes were recorded: the vocabulary size still tells
    config = json.loads((run_copy / "config.json").read_text())
    del config["tokenizer"]["sha256"]
    (run_copy / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(run_copy)]) == 2
    err = error_of(capsys)
    assert "vocab size mismatch" in err and "tokenizer.json" in err


def test_generate_streams_a_continuation(run_dir, capsys):
    args = ["generate", str(run_dir), "--prompt", "The history of", "--max-new-tokens", "12",
            "--temperature", "0", "--ignore-eos", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("The history of") and len(first) > len("The history of\n")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # greedy decoding is deterministic

    sampled = ["generate", str(run_dir), "--prompt", "A", "--max-new-tokens", "8", "--seed", "3",
               "--top-k", "20", "--top-p", "0.9", "--device", "cpu"]
    assert main(sampled) == 0
    a = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == a
    assert main(["generate", str(run_dir),
                 "--device", "cpu", "--max-new-tokens", "5"]) == 0  # no prompt


def test_generate_rejects_bad_sampling_settings(run_dir, capsys):
    assert main(["generate", str(run_dir), "--device", "cpu", "--top-p", "1.5"]) == 2
    assert "top_p" in error_of(capsys)


def test_stream_text_keeps_multibyte_characters_whole(tmp_path):
    from gam.data import load_corpus, train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("".join(f"plain ascii line {i}\n" for i in range(200)))
    tok = train_tokenizer(load_corpus(f"text:{text}"), vocab_size=300, cache_dir=tmp_path)
    prompt = tok.encode("Hi ", add_special_tokens=False).ids
    target = "café 東京 🙂 ok"
    ids = tok.encode(target, add_special_tokens=False).ids
    assert len(ids) > len(target)  # the rare characters are split into byte tokens
    pieces = list(stream_text(tok, prompt, iter(ids)))
    assert "".join(pieces) == target
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 3  # streamed, not printed once at the end


# ------------------------------------------------------------------------ bench and export
def test_bench_and_export_forward_their_arguments(monkeypatch):
    seen = {}
    bench = types.ModuleType("gam.bench")
    bench.main = lambda argv: seen.setdefault("bench", argv) and 0
    export = types.ModuleType("gam.hf.export")
    export.main = lambda argv: seen.setdefault("export", argv) and 5
    monkeypatch.setitem(sys.modules, "gam.bench", bench)
    monkeypatch.setitem(sys.modules, "gam.hf.export", export)
    assert main(["bench", "gates", "--help"]) == 0
    assert main(["export", "RUN", "OUT", "--dtype", "bf16"]) == 5
    assert seen == {"bench": ["gates", "--help"], "export": ["RUN", "OUT", "--dtype", "bf16"]}


def test_missing_subcommand_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gam.hf.export", None)
    assert main(["export", "RUN", "OUT"]) == 2
    assert "gam: error: 'gam export' is not available" in error_of(capsys)


# ---------------------------------------------------------- validation first, progress notes
@pytest.mark.parametrize("flag, value, name", [("--temperature", "-1", "temperature"),
                                               ("--temperature", "nan", "temperature"),
                                               ("--top-p", "0", "top_p")])
def test_generate_validates_before_printing_anything(run_dir, capsys, flag, value, name):
    assert main(["generate", str(run_dir),
                 "--device", "cpu", "--prompt", "The game", flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the prompt is not echoed before the error
    assert name in captured.err and flag in captured.err and "Traceback" not in captured.err


def test_generate_validates_before_loading_the_run(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no-run"), "--temperature", "-1"]) == 2
    assert "temperature" in error_of(capsys)


def test_eval_says_what_it_is_doing_unless_quiet(run_dir, capsys):
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays pure JSON
    assert "evaluating split 'valid'" in captured.err and "evaluated in" in captured.err
    assert main(["eval", str(run_dir), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_train_announces_the_evaluation_and_the_compilation(tmp_path, data_dir, capsys,
                                                            monkeypatch):
    import torch

    monkeypatch.setattr(torch, "compile", lambda model, **_: model)  # the message, not 20 s
    args = [a for a in train_args(tmp_path / "run", "--max-steps", "2", "--compile",
                                  data_dir=data_dir) if a != "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "compiling the model (torch.compile)" in err and "first step took" in err
    assert "evaluating step 2 on" in err


def test_a_run_inside_its_warmup_is_warned_about(tmp_path, data_dir, capsys):
    assert main(train_args(tmp_path / "run", "--max-steps", "2", data_dir=data_dir)) == 0
    err = capsys.readouterr().err  # a warning: shown even with --quiet
    assert "all 2 steps are inside the 100-step warm-up (--warmup-steps)" in err
    assert main(train_args(tmp_path / "run2", "--max-steps", "2", "--warmup-steps", "1",
                           data_dir=data_dir)) == 0
    assert "warm-up" not in capsys.readouterr().err


def test_generate_past_the_window_ends_with_a_note(run_dir, capsys):
    assert main(["generate", str(run_dir),
                 "--device", "cpu", "--prompt", "A", "--max-new-tokens", "80",
                 "--ignore-eos", "--seed", "0"]) == 0  # tiny: max_seq_len 64
    captured = capsys.readouterr()
    assert "max_seq_len" not in captured.out
    assert captured.err.strip().splitlines() == [
        "gam: note: the text grew past the model's max_seq_len (64 tokens); from there on "
        "each token saw only the last 64"]
