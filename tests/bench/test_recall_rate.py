"""``gam bench recall`` over several seeds and lrs: the recall rate, its interval, and one
resumable configuration per (model, length, lr, seed)."""

import json

import pytest

from gam.bench import main
from gam.bench.recall import config_id
from gam.bench.recall_protocol import TEXTBOOK
from gam.bench.recall_report import recall_rates, wilson_interval


def test_wilson_interval_against_hand_computed_values():
    # z = 1.96, z^2 = 3.8415. 4 / 5: centre (0.8 + 0.3841) / 1.7683 = 0.6697, half-width
    # 1.96 * sqrt(0.8 * 0.2 / 5 + 3.8415 / 100) / 1.7683 = 0.2941 -> (0.3755, 0.9638)
    low, high = wilson_interval(4, 5)
    assert low == pytest.approx(0.3755, abs=1e-4) and high == pytest.approx(0.9638, abs=1e-4)
    # 0 / 4: (0, z^2 / n / (1 + z^2 / n)) = (0, 0.9604 / 1.9604) = (0, 0.4899)
    low, high = wilson_interval(0, 4)
    assert low == 0.0 and high == pytest.approx(0.4899, abs=1e-4)
    low, high = wilson_interval(4, 4)  # symmetric
    assert low == pytest.approx(1 - 0.4899, abs=1e-4) and high == 1.0
    assert wilson_interval(0, 0) is None


def _config(model, lr, seed, accuracies, status="ok"):
    return {"model": model, "seq_len": 64, "lr": lr, "seed": seed, "status": status,
            "pairs": {str(q): {"accuracy": a} for q, a in zip((4, 8), accuracies, strict=True)}}


def test_recall_rates_count_a_run_solved_only_when_every_pair_count_is():
    configs = [_config("m", 1e-3, 0, (1.0, 0.95)),   # solved
               _config("m", 1e-3, 1, (1.0, 0.85)),   # one pair count below 0.9
               _config("m", 3e-3, 0, (0.9, 0.9)),    # exactly the threshold: solved
               _config("m", 3e-3, 1, (0.2, 0.1)),
               _config("m", 3e-3, 2, (0.0, 0.0), status="error")]  # not finished
    (row,) = recall_rates(configs, 0.9)
    assert (row["runs"], row["solved"], row["not_finished"]) == (4, 2, 1)
    assert row["rate"] == 0.5
    # 2 / 4: centre 0.5, half-width 1.96 * sqrt(0.0625 + 0.0600) / 1.9604 = 0.3498
    assert row["rate_low"] == pytest.approx(0.1500, abs=1e-4)
    assert row["rate_high"] == pytest.approx(0.8500, abs=1e-4)
    # per-run accuracies (mean over pair counts) 0.975, 0.925, 0.9, 0.15: mean 0.7375,
    # sample std sqrt(((0.2375)^2 + (0.1875)^2 + (0.1625)^2 + (0.5875)^2) / 3)
    # = sqrt(0.463125 / 3) = 0.39291
    assert row["accuracy_mean"] == pytest.approx(0.7375)
    assert row["accuracy_std"] == pytest.approx(0.39291, abs=1e-4)
    assert row["solved_by_lr"] == {"0.001": {"solved": 1, "runs": 2},
                                   "0.003": {"solved": 1, "runs": 2}}
    assert recall_rates(configs, 0.99)[0]["solved"] == 0


def test_seed_zero_keeps_its_configuration_id_and_other_seeds_get_their_own():
    assert config_id(TEXTBOOK, 32, 0.01, 0) == f"{TEXTBOOK}-T32-lr0.01"  # as before seeds
    assert config_id(TEXTBOOK, 32, 0.01, 3) == f"{TEXTBOOK}-T32-lr0.01-seed3"
    assert config_id("transformer:init=gpt2", 64, 3e-3, 1) == (
        "transformer_init=gpt2-T64-lr0.003-seed1")


def _quick(out_dir, *extra):
    return ["recall", "--quick", "--in-process", "--threads", "1", "--device", "cpu",
            "--models", TEXTBOOK, "--steps", "2", "--eval-every", "2", "--out", str(out_dir),
            *extra]


def test_seeds_are_distinct_configurations_reused_on_rerun_and_rated(out_dir, check):
    assert main(_quick(out_dir, "--lrs", "1e-2", "--seeds", "0", "1", "--solved-accuracy",
                       "0.0")) == 0
    results = check.load_results(out_dir)
    configs = results["configs"]
    assert [(c["seed"], c["action"]) for c in configs] == [(0, "trained"), (1, "trained")]
    assert configs[0]["pairs"] != configs[1]["pairs"] or configs[0]["curve"] != configs[1][
        "curve"]  # another initialisation and data stream
    files = sorted(p.name for p in (out_dir / "configs").glob("*.json"))
    assert files == [f"{TEXTBOOK}-T32-lr0.01-seed1.json", f"{TEXTBOOK}-T32-lr0.01.json"]
    (rate,) = results["rates"]
    assert (rate["runs"], rate["solved"], rate["rate"]) == (2, 2, 1.0)  # threshold 0: all
    md = (out_dir / "results.md").read_text()
    assert "## Recall rate over seeds and learning rates" in md and ">= 0%" in md
    assert "Wilson 95% interval" in md and "0.01: 2/2" in md
    assert {r["seed"] for r in results["runs"]} == {0, 1}  # best lr per seed
    # the same command again trains nothing; one more seed trains only that seed
    assert main(_quick(out_dir, "--lrs", "1e-2", "--seeds", "0", "1")) == 0
    assert [c["action"] for c in check.load_results(out_dir)["configs"]] == ["reused"] * 2
    assert main(_quick(out_dir, "--lrs", "1e-2", "--seeds", "0", "1", "2")) == 0
    assert [c["action"] for c in check.load_results(out_dir)["configs"]] == [
        "reused", "reused", "trained"]
    with pytest.raises(ValueError, match="distinct"):
        main(_quick(out_dir, "--seeds", "1", "1"))
    with pytest.raises(ValueError, match="--solved-accuracy"):
        main(_quick(out_dir, "--solved-accuracy", "2"))


def test_one_seed_one_lr_has_no_rate_table_and_seed_flag_still_works(out_dir, check):
    assert main(_quick(out_dir, "--lrs", "1e-2", "--seed", "3")) == 0
    results = check.load_results(out_dir)
    (config,) = results["configs"]
    assert config["seed"] == 3 and results["rates"] == []
    assert "Recall rate" not in (out_dir / "results.md").read_text()
    assert (out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.01-seed3.json").is_file()


def test_a_record_of_another_seed_in_the_old_seed_zero_file_is_reused(out_dir, check):
    # before --seeds, every seed's record was written to the seed-0 name
    assert main(_quick(out_dir, "--lrs", "1e-2", "--seed", "3")) == 0
    new = out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.01-seed3.json"
    old = out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.01.json"
    new.rename(old)
    assert main(_quick(out_dir, "--lrs", "1e-2", "--seeds", "3")) == 0
    (config,) = check.load_results(out_dir)["configs"]
    assert config["action"] == "reused"
    assert json.loads(new.read_text())["key"]["seed"] == 3  # copied to its own name


def test_an_old_record_of_another_seed_survives_training_seed_zero_first(out_dir, check):
    # seed 0 comes first in --seeds: it must not overwrite seed 3's record in the seed-0 file
    assert main(_quick(out_dir, "--lrs", "1e-2", "--seed", "3")) == 0
    new = out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.01-seed3.json"
    old = out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.01.json"
    new.rename(old)
    assert main(_quick(out_dir, "--lrs", "1e-2", "--seeds", "0", "3")) == 0
    actions = {c["seed"]: c["action"] for c in check.load_results(out_dir)["configs"]}
    assert actions == {0: "trained", 3: "reused"}
    assert json.loads(new.read_text())["key"]["seed"] == 3
    assert json.loads(old.read_text())["key"]["seed"] == 0
