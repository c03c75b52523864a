"""Fixtures for the Hugging Face integration tests (tiny models, a hand-made run directory).

Every test module here starts with ``pytest.importorskip("transformers")``, so the folder is
skipped when the optional extra is not installed; this file imports transformers lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gam

VOCAB = 300  # > 257 so that a byte-level BPE (256 bytes + <|endoftext|>) fits
SENTENCES = [
    "The cat sat on the mat.",
    "A dog ran in the park with the cat.",
    "Memory slots hold what the model has learned.",
    "Gated associative memory mixes local and global context.",
    "Once upon a time there was a tiny language model.",
] * 20


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; several threads on a busy machine oversubscribe
    the cores and make the generate loops here many times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(name: str = "gam", seed: int = 0, **overrides) -> gam.CausalLM:
    """A tiny library model in eval mode, with non-trivial biases and norms so that every
    parameter matters in the comparisons."""
    torch.manual_seed(seed)
    model = gam.build_model(name, "tiny", vocab_size=VOCAB, **overrides)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or ".ln" in pname or "ln_f" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def hf_model():
    from gam.hf import GAMForCausalLM

    return GAMForCausalLM.from_gam(tiny_lm(), pad_token_id=0, eos_token_id=1).eval()


def write_bytelevel_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.save(str(path))


def write_paper_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["[UNK]", "[PAD]", "[SOS]", "[EOS]"],
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.save(str(path))


def make_run_dir(root: Path, name: str = "gam", kind: str = "bytelevel", **overrides) -> Path:
    """A run directory as ``gam train`` writes it: model.json + model.safetensors, tokenizer.json
    and the run config (``overrides``: model config fields)."""
    run_dir = root / f"run-{name}-{kind}"
    model = tiny_lm(name, **overrides)
    gam.save_pretrained(model, run_dir)
    (write_bytelevel_tokenizer if kind == "bytelevel" else write_paper_tokenizer)(
        run_dir / "tokenizer.json")
    (run_dir / "config.json").write_text(json.dumps({
        "model": name, "model_config": model.config.to_dict(),
        "tokenizer": {"kind": kind, "vocab_size": VOCAB}, "seed": 0,
    }))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("runs"))


@pytest.fixture
def make_lm():
    """``make_lm(name="gam", seed=0, **overrides)``: a tiny library model (eval mode)."""
    return tiny_lm


@pytest.fixture
def make_run():
    """``make_run(root, name="gam", kind="bytelevel", **overrides)``: a hand-made run
    directory."""
    return make_run_dir


class _WarningRecorder:
    """The warnings transformers logs (its loggers, and warnings.warn) during a test."""

    def __init__(self) -> None:
        import logging

        self.records: list[str] = []
        recorder = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                recorder.records.append(record.getMessage())

        self.handler = _Handler(level=logging.WARNING)

    def clear(self) -> None:
        import transformers.utils.logging as hf_logging

        self.records.clear()
        # warning_once remembers what it said: forget it, so every warning shows again
        getattr(hf_logging.warning_once, "cache_clear", lambda: None)()

    def messages(self) -> list[str]:
        return list(self.records)


@pytest.fixture
def hf_warnings(recwarn):
    """Records what transformers warns; ``.messages()`` adds Python warnings raised since."""
    import logging

    recorder = _WarningRecorder()
    logger = logging.getLogger("transformers")
    logger.addHandler(recorder.handler)
    recorder.clear()
    original = recorder.messages

    def messages() -> list[str]:
        python = [str(w.message) for w in recwarn.list]
        return original() + python

    recorder.messages = messages  # type: ignore[method-assign]
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder.handler)
