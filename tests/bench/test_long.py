"""``gam bench long``: the loss-by-position accounting, and one ``--quick`` end-to-end run (two
families, one small synthetic corpus, one thread) that is reused when run again."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from gam.bench import main as bench_main
from gam.bench.long import default_families
from gam.bench.long_measure import (
    context_gains,
    context_used,
    farthest_help,
    position_buckets,
    truncated_losses,
)
from gam.bench.long_records import unrecordable
from gam.data.tokenizer import tokenizer_hash
from gam.models import build_model
from gam.training.evaluate import evaluate, evaluate_by_position, token_losses

WORDS = "the cat dog sat ran on a mat tree house river big small red and then it was".split()


@pytest.mark.parametrize("n_tokens", [1000, 641])
def test_loss_by_position_sums_back_to_the_mean_loss(one_torch_thread, n_tokens):
    torch.manual_seed(0)
    model = build_model("gam", "tiny", max_seq_len=100).eval()
    ids = np.random.default_rng(0).integers(0, 256, n_tokens)
    by_pos = evaluate_by_position(model, ids, 100, batch_size=3)
    plain = evaluate(model, ids, 100, batch_size=4)
    sums, counts = by_pos["position_loss_sum"], by_pos["position_tokens"]
    assert counts.sum() == by_pos["tokens"] == plain["tokens"] == n_tokens - 1
    # every window has position 1; only the full windows reach position 100
    assert counts[0] == math.ceil((n_tokens - 1) / 100)
    assert counts[-1] == (n_tokens - 1) // 100
    assert by_pos["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    buckets = position_buckets(sums, counts, (16, 64, 256))
    assert [(b["first"], b["last"]) for b in buckets] == [(1, 16), (17, 64), (65, 100)]
    assert sum(b["tokens"] for b in buckets) == by_pos["tokens"]
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / by_pos["tokens"]
    assert weighted == pytest.approx(by_pos["loss"], rel=1e-12)
    assert math.fsum(b["loss_sum"] for b in buckets) == pytest.approx(float(sums.sum()),
                                                                      rel=1e-12)


def test_bucket_errors_are_across_windows(one_torch_thread):
    torch.manual_seed(0)
    model = build_model("gam", "tiny", max_seq_len=50).eval()
    ids = np.random.default_rng(1).integers(0, 256, 321)  # 6 full windows and a part
    by_pos = evaluate_by_position(model, ids, 50, batch_size=4, keep_blocks=True)
    blocks = by_pos["block_losses"]
    assert blocks.shape == (7, 50)
    assert np.isnan(blocks).sum() == 7 * 50 - by_pos["tokens"]
    np.testing.assert_allclose(np.nansum(blocks, 0), by_pos["position_loss_sum"], rtol=1e-12)
    buckets = position_buckets(by_pos["position_loss_sum"], by_pos["position_tokens"], (20,),
                               blocks)
    assert [b["windows"] for b in buckets] == [7, 6]  # the part window ends at position 20
    means = [np.nanmean(row[20:]) for row in blocks if not np.isnan(row[20:]).all()]
    assert buckets[1]["se"] == pytest.approx(np.std(means, ddof=1) / np.sqrt(6), rel=1e-12)
    assert position_buckets([1.0, 2.0], [1, 1], (1,), [[1.0, 2.0]])[0]["se"] is None
    # the drop is paired within the windows that have both buckets (not the part window)
    first = [np.nanmean(row[:20]) for row in blocks]
    diffs = [a - m for a, m in zip(first[:6], means, strict=True)]
    assert "drop" not in buckets[0]
    assert buckets[1]["drop"] == pytest.approx(np.mean(diffs), rel=1e-12)
    assert buckets[1]["drop_se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(6),
                                                  rel=1e-12)


def test_truncated_losses_score_each_target_from_its_last_k_to_2k_tokens(one_torch_thread):
    torch.manual_seed(0)
    model = build_model("gam", "tiny", max_seq_len=64).eval()
    ids = np.random.default_rng(2).integers(0, 256, 300)  # 4 full windows and a part
    out = truncated_losses(model, ids, 64, keep=8, batch_size=5)
    assert out.shape == (5, 64)
    assert np.isnan(out[:, :16]).all() and not np.isnan(out[:4, 16:]).any()
    assert np.isnan(out[4, 299 - 4 * 64:]).all() and not np.isnan(out[4, 16:299 - 4 * 64]).any()
    for b, j in [(0, 16), (0, 23), (1, 24), (3, 63), (4, 20)]:
        start = b * 64 + (j // 8 - 1) * 8  # the chunk that scores target j: j+1 - start tokens
        x = torch.from_numpy(ids[start:b * 64 + j + 1])[None]
        y = torch.from_numpy(ids[start + 1:b * 64 + j + 2])[None]
        with torch.no_grad():
            direct = token_losses(model, x, y)[0, -1].item()
        assert out[b, j] == pytest.approx(direct, rel=1e-4, abs=1e-5)
        assert 8 < x.shape[1] <= 16


def test_context_gains_pair_the_same_targets():
    rng = np.random.default_rng(0)
    full = 4.0 + rng.normal(0.0, 1.0, (40, 32))  # targets differ a lot, pairs by little
    truncated = {4: full + 0.3 + rng.normal(0.0, 0.05, full.shape),
                 8: full + rng.normal(0.0, 0.05, full.shape)}
    truncated[4][:, :8] = np.nan  # scored from 2k on only
    truncated[8][:, :16] = np.nan
    gains = context_gains(full, truncated)
    assert [g["keep"] for g in gains] == [4, 8]
    assert gains[0]["gain"] == pytest.approx(0.3, abs=0.02) and gains[0]["se"] < 0.01
    assert abs(gains[1]["gain"]) < 0.02 and gains[1]["tokens"] == 40 * 16
    assert farthest_help(gains) == 4
    assert farthest_help(gains[1:]) == 0 and farthest_help([]) is None


def test_context_used_is_the_farthest_bucket_that_still_helps():
    # windows x positions: loss falls from bucket 1 (positions 1-2) to 2 (3-4) in every
    # window, not from 2 to 3 (5-8) on average, then falls again from 3 to 4 (9-16)
    rng = np.random.default_rng(0)
    windows = 30
    noise = rng.normal(0.0, 0.05, (windows, 16))
    level = np.concatenate([np.full(2, 5.0), np.full(2, 4.0), np.full(4, 4.0), np.full(8, 3.5)])
    blocks = level + noise
    buckets = position_buckets(blocks.sum(0), np.full(16, windows), (2, 4, 8), blocks)
    assert [round(b["drop"], 1) for b in buckets[1:]] == [1.0, 0.0, 0.5]
    assert context_used(buckets) == 16
    assert context_used(buckets[:3]) == 4  # up to 8: the last drop is noise
    flat = 4.0 + noise
    assert context_used(position_buckets(flat.sum(0), np.full(16, windows), (2, 4, 8),
                                         flat)) == 2
    assert context_used(position_buckets(flat.sum(0), np.full(16, windows), (2, 4, 8))) is None


def test_default_families_are_the_registered_main_ones():
    families = default_families()
    assert {"gam", "gam-delta", "transformer", "mamba", "s4d"} <= set(families)
    assert "gam-sum" not in families


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("GAM_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
                                + " ." for _ in range(600)) + "\n")
    threads = torch.get_num_threads()
    yield tmp_path, corpus
    torch.set_num_threads(threads)


def test_quick_run_two_families(env, check):
    tmp_path, corpus = env
    out = tmp_path / "long"
    argv = ["long", "--quick", "--models", "gam", "s4d", "--datasets", f"text:{corpus}",
            "--threads", "1", "--quiet", "--out", str(out)]
    assert bench_main(argv) == 0
    res = check.load_results(out)
    check.assert_environment(res)
    rows = res["runs"]
    assert [(r["family"], r["part"], r["T"], r["status"], r["eval_status"]) for r in rows] == [
        ("gam", "lm", 128, "ok", "ok"), ("s4d", "lm", 128, "ok", "ok"),
        ("gam", "passkey", 128, "ok", "ok"), ("s4d", "passkey", 128, "ok", "ok")]
    lm, passkey = rows[:2], rows[2:]
    for r in lm:
        assert sum(b["tokens"] for b in r["buckets"]) == r["position_tokens"]
        assert all(b["windows"] >= 1 and "se" in b for b in r["buckets"])
        assert all("drop_se" in b for b in r["buckets"][1:])
        assert [g["keep"] for g in r["context_gains"]] == [16]  # 2k < T = 128
        assert r["context_gains"][0]["tokens"] > 0
        assert r["position_loss"] == pytest.approx(r["val_loss"], rel=1e-4)
        assert r["decode_tokens_per_s"] > 0 and r["step_tokens_per_s"] > 0
        assert r["peak_mem_mb"] is not None and r["params_total"] > 0
        assert "passkey" not in r
        config = json.loads((tmp_path / r["run_dir"] / "config.json").read_text())
        assert config["data"]["passkey_mix"] == 0 and config["data"]["seq_len"] == 128
    for r in passkey:
        assert "buckets" not in r and r["steps"] == 4
        by_length = {c["length"]: c["status"] for c in r["passkey"]}
        assert by_length[128] == "ok"
        config = json.loads((tmp_path / r["run_dir"] / "config.json").read_text())
        assert config["data"]["passkey_mix"] == 0.9 and config["data"]["seq_len"] == 128
        assert config["schedule"]["per_process_batch_size"] == 1
    # 2T: GAM has learned positions (none past T); S4D has none and is evaluated there
    assert {c["status"] for c in passkey[0]["passkey"] if c["length"] == 256} == {"n/a"}
    assert {c["status"] for c in passkey[1]["passkey"] if c["length"] == 256} == {"ok"}
    check.assert_png(out / "positions-text-corpus.png")
    check.assert_png(out / "gains-text-corpus.png")
    assert res["settings"]["passkey"] == {"context": 128, "steps": 4, "batch": 1, "mix": 0.9,
                                          "dataset": f"text:{corpus}"}
    # the same command again uses each configuration's record; --report-only too
    assert bench_main(argv) == 0
    again = check.load_results(out)
    assert {(r["action"], r["eval_action"]) for r in again["runs"]} == {
        ("recorded", "recorded")}
    assert [r["val_ppl"] for r in again["runs"]] == [r["val_ppl"] for r in rows]
    assert bench_main([*argv, "--report-only"]) == 0
    text = (out / "results.md").read_text()
    assert "Passkey retrieval accuracy" in text and "5-16" in text and "context used" in text
    assert "What the tokens further back are worth" in text and "farthest help" in text
    summary = text[text.index("## Summary"):text.index("## text:")]
    assert "| gam | " in summary and "| s4d | " in summary and "at 512 |" in summary
    # a passkey setting changed: the passkey runs are reused and re-evaluated (their records
    # no longer match), the others' records kept
    assert bench_main([*argv, "--passkey-samples", "1"]) == 0
    again = check.load_results(out)
    assert [(r["action"], r["eval_action"]) for r in again["runs"]] == [
        ("recorded", "recorded"), ("recorded", "recorded"), ("reused", "evaluated"),
        ("reused", "evaluated")]
    # each setting keeps its own record (none replaced): two per passkey run now
    records = sorted(p.name for p in (out / "records").rglob("*.json"))
    assert len(records) == 6 and sum(n.startswith("gam-passkey-T128-seed0-") for n in records) == 2
    kept = json.loads(next((out / "records").rglob("s4d-T128-seed0-*.json")).read_text())
    assert kept["result"]["run_dir"] == "runs/text-corpus/s4d-T128-seed0"  # relative to --out
    assert kept["result"]["evaluated_on"]["threads"] == 1
    # the records outlive the run folders (a grid finished across machines) ...
    shutil.rmtree(out / "runs")
    shutil.rmtree(out / "evals")
    assert bench_main([*argv, "--passkey-samples", "1", "--report-only"]) == 0
    again = check.load_results(out)
    assert [(r["status"], r["eval_status"]) for r in again["runs"]] == [("ok", "ok")] * 4
    assert again["runs"][2]["passkey"] != rows[2]["passkey"]  # the one-sample evaluation
    assert "were evaluated on" in (out / "results.md").read_text()
    # ... only under the settings they were made with ...
    assert bench_main([*argv, "--lr", "0.01", "--report-only"]) == 0
    assert {r["status"] for r in check.load_results(out)["runs"]} == {"not run"}
    assert len(list((out / "records").rglob("*.json"))) == 6  # --report-only writes none
    # ... in a folder of their own, and for the data they were measured on
    moved = tmp_path / "kept-records"
    (out / "records").rename(moved)
    assert bench_main([*argv, "--passkey-samples", "1", "--report-only"]) == 0
    assert {r["status"] for r in check.load_results(out)["runs"]} == {"not run"}
    with_records = [*argv, "--passkey-samples", "1", "--report-only", "--records", str(moved)]
    assert bench_main(with_records) == 0
    assert {r["status"] for r in check.load_results(out)["runs"]} == {"ok"}
    corpus.write_text("the cat sat on the big red mat .\n" + corpus.read_text())
    assert bench_main(with_records) == 0
    assert {r["status"] for r in check.load_results(out)["runs"]} == {"not run"}


@pytest.mark.parametrize("argv, message", [
    (["--contexts", "1000"], "must divide --tokens-per-step"),
    (["--passkey-mix", "1.5"], "passkey_mix"),
    (["--passkey-steps", "0"], "--passkey-steps must be positive"),
    (["--passkey-samples", "0"], "--passkey-samples must be positive"),
    (["--tokens-per-step", "0"], "--tokens-per-step must be positive"),
    (["--passkey-depths", "1.2"], "--passkey-depths"),
    (["--models", "gam", "gam"], "twice"),
])
def test_bad_settings_are_one_line_usage_errors(tmp_path, capsys, argv, message):
    assert bench_main(["long", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_run_made_on_other_data_is_not_recorded(tmp_path):
    # a finished run folder is reused as it is, whatever today's corpus: its row is kept as a
    # record only when it was made on today's data and tokenizer
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))
    today = {"fingerprints": {"train": "t", "valid": "v"},
             "tokenizer_sha256": tokenizer_hash(Tokenizer.from_file(
                 str(tmp_path / "tokenizer.json")))}
    row = {"run_dir": str(tmp_path), "data_fingerprints": {"train": "t", "valid": "v",
                                                            "test": "x"}}
    assert unrecordable(row, today) is None
    older = {**row, "data_fingerprints": {"train": "t0", "valid": "v", "test": "x"}}
    assert "another version of the corpus" in unrecordable(older, today)
    assert "tokenizer is not" in unrecordable(row, {**today, "tokenizer_sha256": "other"})
    assert "cannot be read" in unrecordable({**row, "run_dir": str(tmp_path / "gone")}, today)
