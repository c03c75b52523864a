"""Smoke tests of ``gam bench compare``, ``gam bench ablate`` and ``gam bench gates`` on tiny
configurations (``--quick`` with a few steps, one thread): seconds each, no timing asserts.

Every test runs with a private cache (``$GAM_CACHE_DIR``), no ``$GAM_DATA_DIR``, no Hugging Face
hub and matplotlib's Agg backend. The corpus is a small synthetic text written by the tests
(``text:PATH``); one test uses the shared WikiText-2 and skips when it is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch

from gam.bench import main as bench_main
from gam.bench import training_bench as tr
from gam.training.rundir import dataset_slug, is_run_dir, training_lock

WORDS = ("the cat dog bird sat ran on under a an mat tree house river saw big small red "
         "green quick slow and then it was day night when where who what very old new one "
         "two three four five man woman child king queen city road hill sea ship").split()
STEPS = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Module-wide isolation (the runs are shared by several tests): private cache, no data dir
    from the environment, no hub, Agg backend; torch threads restored afterwards."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("gam-cache")
    mp.setenv("GAM_CACHE_DIR", str(cache))
    mp.setenv("MPLBACKEND", "Agg")
    mp.delenv("GAM_DATA_DIR", raising=False)
    mp.setitem(sys.modules, "datasets", None)
    threads = torch.get_num_threads()
    yield tmp_path_factory.mktemp("bench")
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def corpus(env) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + " ."
             for _ in range(1200)]
    path = env / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _bench(*argv: str) -> int:
    return bench_main([str(a) for a in argv])


def _quick(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--quick", "--threads", "1", "--device", "cpu", "--quiet", "--max-steps", str(STEPS),
            "--out", str(out), *extra]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def compared(env, corpus) -> Path:
    out = env / "compare"
    rc = _bench("compare", *_quick(out, corpus, "--models", "gam", "transformer",
                                   "--datasets", f"text:{corpus}"))
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------- compare
def test_compare_quick_results_and_identical_protocol(compared, corpus):
    res = _results(compared)
    for key in ("runs", "summary", "paper", "environment", "command", "protocol",
                "protocol_check", "datasets"):
        assert key in res, key
    assert res["paper"]["wikitext2"]["gam"]["val_ppl"] == 882.57
    assert res["paper"]["wikitext2"]["mamba"]["epoch_time_s"] == 127.1
    assert res["command"].startswith("gam bench compare")
    runs = res["runs"]
    assert [r["model"] for r in runs] == ["gam", "transformer"]
    for r in runs:
        assert r["status"] == "ok" and r["action"] == "trained"
        assert r["steps"] == STEPS == r["total_steps"]
        assert r["params_total"] > r["params_non_embedding"] > 0
        assert r["val_loss"] > 0 and math.isclose(r["val_ppl"], math.exp(r["val_loss"]),
                                                  rel_tol=1e-9)
        assert r["tokens_per_s"] > 0 and r["epoch_time_s"] > 0
        assert r["epoch_time_basis"] == "extrapolated"  # 6 steps < 1 epoch
    # identical tokenizer, data, steps and data order, from the run folders themselves
    dirs = [Path(r["run_dir"]) for r in runs]
    assert dirs[0].parent.name == "text-corpus" and dirs[0].name == "gam-seed0"
    assert (dirs[0] / "tokenizer.json").read_bytes() == (dirs[1] / "tokenizer.json").read_bytes()
    configs = [json.loads((d / "config.json").read_text()) for d in dirs]
    assert configs[0]["data"]["fingerprints"] == configs[1]["data"]["fingerprints"]
    assert configs[0]["data"]["tokens"] == configs[1]["data"]["tokens"]
    assert configs[0]["schedule"] == configs[1]["schedule"]
    assert configs[0]["train"] == configs[1]["train"]  # same seed -> same data order
    check = res["protocol_check"][f"text:{corpus}"]
    assert check["identical_tokenizer"] and check["identical_data"]
    assert check["identical_steps"] and check["steps"] == [STEPS]
    assert len(res["summary"]) == 2 and all(s["n"] == 1 for s in res["summary"])
    assert (compared / "results.md").read_text().count("| gam |") == 1
    assert (compared / "curves-text-corpus.png").stat().st_size > 0


def test_compare_reuses_finished_runs(compared, corpus):
    before = {p: p.read_bytes() for p in compared.glob("runs/*/*/metrics.jsonl")}
    rc = _bench("compare", *_quick(compared, corpus, "--models", "gam", "transformer",
                                   "--datasets", f"text:{corpus}"))
    assert rc == 0
    res = _results(compared)
    assert [r["action"] for r in res["runs"]] == ["reused", "reused"]
    assert all(r["status"] == "ok" and r["steps"] == STEPS for r in res["runs"])
    assert {p: p.read_bytes() for p in before} == before  # nothing retrained or appended


def test_compare_report_only_trains_nothing(compared, corpus):
    before = sorted(compared.glob("runs/*/*"))
    rc = _bench("compare", *_quick(compared, corpus, "--models", "gam", "transformer",
                                   "--seeds", "0", "1", "--datasets", f"text:{corpus}",
                                   "--report-only"))
    assert rc == 0
    assert sorted(compared.glob("runs/*/*")) == before  # no folder for seed 1
    res = _results(compared)
    by_seed = {(r["model"], r["seed"]): r for r in res["runs"]}
    assert by_seed[("gam", 0)]["action"] == "reused" and by_seed[("gam", 0)]["status"] == "ok"
    assert by_seed[("gam", 1)]["status"] == "not run"
    (gam,) = [row for row in res["summary"] if row["model"] == "gam"]
    assert gam["n"] == 1 and gam["not_run_seeds"] == [1] and gam["failed_seeds"] == []
    assert "| 1 (1 not run) |" in (compared / "results.md").read_text()


def test_compare_refuses_a_run_folder_with_another_configuration(compared, corpus, env):
    out = env / "compare-conflict"
    shutil.copytree(compared / "runs", out / "runs")
    rc = _bench("compare", *_quick(out, corpus, "--models", "gam", "--datasets",
                                   f"text:{corpus}", "--lr", "0.001"))
    assert rc == 1
    row = _results(out)["runs"][0]
    assert row["status"] == "error" and "another configuration" in row["error"]
    assert "train.lr" in row["error"]


def _forget_model_field(run_dir: Path, field: str) -> None:
    """Make a run folder look made before the model config had ``field`` (both records)."""
    config = json.loads((run_dir / "config.json").read_text())
    del config["model_config"][field]
    (run_dir / "config.json").write_text(json.dumps(config))
    saved = json.loads((run_dir / "model.json").read_text())
    del saved["config"][field]
    (run_dir / "model.json").write_text(json.dumps(saved))


def test_compare_refuses_a_run_made_under_another_model_default(env, corpus):
    """A finished S4D run recorded without ``ssm_lr`` trained its SSM parameters as the others
    (the legacy value, None): it is not the run of today's default (1e-3), so it is refused,
    not reused; the same run made now is reused."""
    out = env / "compare-legacy-s4d"
    argv = _quick(out, corpus, "--models", "s4d", "--datasets", f"text:{corpus}")
    assert _bench("compare", *argv) == 0
    assert _bench("compare", *argv) == 0
    assert _results(out)["runs"][0]["action"] == "reused"
    run_dir = Path(_results(out)["runs"][0]["run_dir"])
    _forget_model_field(run_dir, "ssm_lr")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert _bench("compare", *argv) == 1
    row = _results(out)["runs"][0]
    assert row["status"] == "error" and "another configuration" in row["error"]
    assert str(run_dir) in row["error"] and "model_config.ssm_lr: None (found)" in row["error"]
    assert "\n" not in row["error"]
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing trained or resumed


def test_model_differences_of_records_made_now_and_before():
    """Every family's record made by the current code matches the run it would build now; a
    record lacking a field means the field's legacy value where it has one (else the default)."""
    from gam.bench.protocols import PROTOCOLS
    from gam.bench.runs import model_differences
    from gam.models.registry import MODELS, model_config

    protocol = PROTOCOLS["quick"]

    def record(name, **overrides):
        run = protocol.run_config(name, "wikitext2", 0, overrides, None)
        made = model_config(name, run.model_preset, **run.model_kwargs()).to_dict()
        return run, json.loads(json.dumps(made))

    for name in MODELS:
        run, made = record(name)
        assert model_differences(run, {"model_config": made}) == [], name
    run, made = record("s4d")
    del made["ssm_lr"]  # made before ssm_lr existed: trained as the other parameters
    assert model_differences(run, {"model_config": made}) == [
        "model_config.ssm_lr: None (found) vs 0.001 (requested)"]
    run, made = record("s4d", ssm_lr=None)
    del made["ssm_lr"]
    assert model_differences(run, {"model_config": made}) == []
    run, made = record("gam")
    del made["final_norm"]  # no legacy value: the default, which it was built with
    assert model_differences(run, {"model_config": made}) == []
    del made["init"], made["tie_embeddings"]  # made before init existed: the paper init, tied
    assert model_differences(run, {"model_config": made}) == [
        "model_config.init: 'paper' (found) vs 'untied' (requested)",
        "model_config.tie_embeddings: True (found) vs False (requested)"]
    assert model_differences(run, {"model_config": {**made, "gone": 1}})[0].startswith(
        "model_config: does not build a 'gam' model now")
    assert model_differences(run, {}) == ["model_config: none recorded"]


def test_compare_resumes_an_interrupted_run(env, corpus, monkeypatch):
    from gam.training import trainer

    out = env / "compare-resume"
    calls = {"n": 0}
    original = trainer.Trainer._train_step

    def dying_step(self, x, y):
        calls["n"] += 1
        if calls["n"] > 5:  # after the checkpoint of step 5 (quick: save_every 5)
            raise RuntimeError("simulated kill")
        return original(self, x, y)

    monkeypatch.setattr(trainer.Trainer, "_train_step", dying_step)
    argv = _quick(out, corpus, "--models", "gam", "--datasets", f"text:{corpus}")
    assert _bench("compare", *argv) == 1
    row = _results(out)["runs"][0]
    assert row["status"] == "error" and "simulated kill" in row["error"]
    monkeypatch.setattr(trainer.Trainer, "_train_step", original)
    assert _bench("compare", *argv) == 0
    row = _results(out)["runs"][0]
    assert row["action"] == "resumed" and row["resumed_from_step"] == 5
    assert row["status"] == "ok" and row["steps"] == STEPS


def test_compare_skips_a_run_another_process_is_training(env, corpus):
    out = env / "compare-busy"
    argv = _quick(out, corpus, "--models", "gam", "--datasets", f"text:{corpus}")
    run_dir = out / "runs" / dataset_slug(f"text:{corpus}") / "gam-seed0"
    with training_lock(run_dir):  # another lane training the same run
        assert _bench("compare", *argv) == 1
        row = _results(out)["runs"][0]
        assert row["status"] == "not run" and row["action"] == "skipped"
        assert "being trained by another process" in row["error"]
        assert not is_run_dir(run_dir)  # nothing written into it
    assert _bench("compare", *argv) == 0  # free again: trained now
    assert _results(out)["runs"][0]["action"] == "trained"


def test_summary_mean_and_std_over_seeds():
    rows = [{"dataset": "d", "model": "m", "seed": k, "status": "ok", "val_loss": v,
             "val_ppl": math.exp(v), "epoch_time_s": 10.0 + k, "tokens_per_s": 100.0 * (k + 1),
             "time_per_step_s": 0.5, "params_total": 7, "params_non_embedding": 3}
            for k, v in enumerate([2.0, 2.5, 3.1])]
    rows.append({"dataset": "d", "model": "m", "seed": 3, "status": "error"})
    rows.append({"dataset": "d", "model": "other", "seed": 0, "status": "ok", "val_loss": 4.0,
                 "val_ppl": math.exp(4.0)})
    summary = {s["model"]: s for s in tr.summarize(rows)}
    s = summary["m"]
    assert s["n"] == 3 and s["seeds"] == [0, 1, 2] and s["failed_seeds"] == [3]
    losses = [2.0, 2.5, 3.1]
    assert math.isclose(s["val_loss_mean"], statistics.fmean(losses))
    assert math.isclose(s["val_loss_std"], statistics.stdev(losses))  # sample std (n - 1)
    ppls = [math.exp(v) for v in losses]
    assert math.isclose(s["val_ppl_mean"], statistics.fmean(ppls))
    assert math.isclose(s["val_ppl_std"], statistics.stdev(ppls))
    assert math.isclose(s["epoch_time_s_mean"], 11.0)
    assert s["params_total"] == 7
    assert summary["other"]["n"] == 1 and summary["other"]["val_loss_std"] is None
    assert tr.mean_std([1.0, None, float("nan"), 3.0]) == (2.0, math.sqrt(2.0), 2)


def test_compare_seeds_aggregate_rows(env, corpus):
    out = env / "compare-seeds"
    rc = _bench("compare", *_quick(out, corpus, "--models", "gam", "--datasets",
                                   f"text:{corpus}", "--seeds", "0", "1", "--max-steps", "3"))
    assert rc == 0
    res = _results(out)
    runs = res["runs"]
    assert [(r["model"], r["seed"]) for r in runs] == [("gam", 0), ("gam", 1)]
    assert runs[0]["val_loss"] != runs[1]["val_loss"]  # different init and data order
    (s,) = res["summary"]
    assert s["seeds"] == [0, 1]
    losses = [r["val_loss"] for r in runs]
    assert math.isclose(s["val_loss_mean"], statistics.fmean(losses))
    assert math.isclose(s["val_loss_std"], statistics.stdev(losses))
    assert " ± " in (out / "results.md").read_text()


def test_compare_model_arg_reaches_every_run(env, corpus):
    out = env / "compare-model-arg"
    rc = _bench("compare", *_quick(out, corpus, "--models", "gam", "transformer", "--datasets",
                                   f"text:{corpus}", "--max-steps", "2",
                                   "--model-arg", "pos_embedding_std=0.02"))
    assert rc == 0
    runs = _results(out)["runs"]
    assert [r["overrides"] for r in runs] == [{"pos_embedding_std": 0.02}] * 2
    for r in runs:
        config = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert "0.02" in json.dumps(config)


def test_compare_bad_model_is_a_usage_error(env, corpus, capsys):
    rc = _bench("compare", *_quick(env / "bad", corpus, "--models", "gam", "nope",
                                   "--datasets", f"text:{corpus}"))
    assert rc == 2
    assert "nope" in capsys.readouterr().err


def test_compare_on_shared_wikitext2(env, data_dir):
    out = env / "compare-wikitext"
    rc = _bench("compare", "--quick", "--threads", "1", "--quiet", "--max-steps", "2",
                "--max-train-rows", "300", "--max-val-rows", "40", "--models", "gam",
                "--data-dir", str(data_dir), "--out", str(out))
    assert rc == 0
    res = _results(out)
    (row,) = res["runs"]
    assert row["dataset"] == "wikitext2" and row["status"] == "ok" and row["steps"] == 2
    assert "wikitext-2-raw" in res["datasets"]["wikitext2"]["source"]


# ----------------------------------------------------------------------------------- ablate
def test_ablate_quick_variants_and_slots(env, corpus):
    out = env / "ablate"
    rc = _bench("ablate", *_quick(out, corpus, "--variants", "gam", "gam-local-only",
                                  "--slots", "8", "16", "--dataset", f"text:{corpus}"))
    assert rc == 0
    res = _results(out)
    assert res["paper"]["params_millions"] == {"gam": 22.6, "gam-global-only": 19.4,
                                               "gam-sum": 19.4, "gam-local-only": 17.9}
    assert res["paper_preset_params"]["gam"]["total"] == 22_599_680
    assert [s["model"] for s in res["summary"]] == ["gam", "gam-local-only"]
    local = next(s for s in res["summary"] if s["model"] == "gam-local-only")
    full = next(s for s in res["summary"] if s["model"] == "gam")
    assert local["params_total"] < full["params_total"]
    sweep = res["slots_sweep"]
    assert [p["slots"] for p in sweep] == [8, 16]
    # tiny's own slot count (16) is the full model's run, shared rather than retrained
    assert sweep[1]["model"] == "gam"
    assert sweep[0]["model"] == "gam-slots8" and sweep[0]["params_total"] < full["params_total"]
    trained = [r for r in res["runs"] if r["action"] == "trained"]
    assert len(trained) == 3
    assert all(r["steps"] == STEPS for r in res["runs"])
    assert res["protocol_check"][f"text:{corpus}"]["identical_tokenizer"]
    assert (out / "slots-text-corpus.png").is_file()
    assert (out / "curves-text-corpus.png").is_file()


# ------------------------------------------------------------------------------------ gates
def test_gates_on_a_trained_gam_run(compared, env):
    run_dir = compared / "runs" / "text-corpus" / "gam-seed0"
    out = env / "gates"
    rc = _bench("gates", str(run_dir), "--quick", "--threads", "1", "--out", str(out))
    assert rc == 0
    (result,) = _results(out)["runs"]
    n_layers = json.loads((run_dir / "config.json").read_text())["model_config"]["n_layers"]
    assert result["n_layers"] == n_layers == len(result["layers"])
    for row in result["layers"]:
        for key in ("local_mean", "global_mean"):
            assert 0.0 < row[key] < 1.0
        for key in ("local_std", "global_std"):
            assert row[key] >= 0.0
    assert result["evolution"] and result["evolution"][-1]["step"] == STEPS
    md = (out / "results.md").read_text()
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and
                  not ln.startswith("| layer")]
    assert len(table_rows) == n_layers
    assert (out / result["bar_png"]).is_file() and (out / result["evolution_png"]).is_file()


def test_gates_rejects_runs_without_gates(compared, env, capsys):
    rc = _bench("gates", str(compared / "runs" / "text-corpus" / "transformer-seed0"),
                "--out", str(env / "gates-bad"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "'transformer' run" in err and "GAM" in err
    assert not (env / "gates-bad" / "results.json").exists()


def test_gates_rejects_gam_ablation_without_gates(env, tmp_path, capsys):
    run_dir = tmp_path / "gam-sum-run"
    run_dir.mkdir()
    config = {"model": "gam-sum", "model_config": {"use_local": True, "use_global": True,
                                                   "use_gate": False}}
    (run_dir / "config.json").write_text(json.dumps(config))
    assert _bench("gates", str(run_dir), "--out", str(tmp_path / "out")) == 2
    assert "without gates" in capsys.readouterr().err


def test_protocol_presets_and_overrides(env):
    from gam.bench import build_parser, load_command

    parser = build_parser("compare", load_command("compare"))
    args = parser.parse_args(["--preset", "paper"])
    p = tr.resolve_protocol(args)
    assert (p.model_preset, p.vocab_size, p.seq_len, p.batch_size, p.epochs, p.lr) == \
        ("paper", 10000, 256, 32, 5, 3e-4)
    assert (p.max_train_rows, p.max_val_rows, p.max_steps) == (50000, 5000, None)
    args = parser.parse_args(["--max-steps", "7", "--dtype", "fp32", "--max-val-rows", "none"])
    p = tr.resolve_protocol(args)
    assert (p.name, p.model_preset, p.max_steps, p.dtype, p.max_val_rows) == \
        ("cpu", "cpu-small", 7, "fp32", None)
    assert tr.seeds_of(parser.parse_args(["--seed", "3"])) == [3]
    assert tr.seeds_of(parser.parse_args(["--seeds", "0", "1", "2"])) == [0, 1, 2]
    assert tr.resolve_data_dir("somewhere") == ("somewhere", True)
    assert tr.resolve_data_dir(None)[1] is False


def test_the_tokenizer_kind_has_one_name_and_its_old_one_still_reads():
    """``tokenizer_kind`` (``--tokenizer-kind``) was ``tokenizer``: a results.json protocol
    written then reads the same."""
    from gam.bench import build_parser, load_command
    from gam.bench.protocols import PROTOCOLS, Protocol

    cpu = PROTOCOLS["cpu"]
    assert cpu.to_dict()["tokenizer_kind"] == "paper"
    old = {("tokenizer" if k == "tokenizer_kind" else k): v for k, v in cpu.to_dict().items()}
    assert Protocol.from_dict(old).to_dict() == cpu.to_dict()
    parser = build_parser("compare", load_command("compare"))
    args = parser.parse_args(["--tokenizer-kind", "bytelevel"])
    assert tr.resolve_protocol(args).tokenizer_kind == "bytelevel"


def test_an_overridden_protocol_says_so_in_its_description():
    from gam.bench.protocols import PROTOCOLS, protocol_markdown

    cpu = PROTOCOLS["cpu"]
    assert cpu.override().description == cpu.description
    assert cpu.override(lr=cpu.lr).description == cpu.description  # not a change
    longer = cpu.override(epochs=2, max_steps=None)
    assert "400 optimizer steps" in cpu.description  # the preset's own budget ...
    assert "this run overrides epochs=2, max_steps=None" in longer.description  # ... qualified
    assert "overrides epochs=2" in protocol_markdown(longer, [0])


def test_the_overridable_settings_are_those_with_an_override_text():
    from dataclasses import fields

    from gam.bench.protocols import OVERRIDABLE, add_protocol_arguments
    from gam.training.config import DataConfig, RunConfig, TokenizerConfig, TrainConfig
    from gam.training.options import setting_key

    marked = {setting_key(f) for cls in (RunConfig, DataConfig, TokenizerConfig, TrainConfig)
              for f in fields(cls) if f.metadata.get("override")}
    assert set(OVERRIDABLE) == marked - {"passkey_mix"}
    parser = argparse.ArgumentParser()
    add_protocol_arguments(parser)
    assert {a.dest for a in parser._actions} >= set(OVERRIDABLE)
