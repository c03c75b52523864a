import json
from dataclasses import replace

import pytest
import torch

from gam.bench import main
from gam.bench.recall_protocol import (
    TEXTBOOK,
    Protocol,
    build_recall_model,
    parse_variant,
    protocol_key,
)
from gam.bench.recall_report import choose_lr
from gam.constants import IGNORE_INDEX
from gam.data.mqar import make_mqar_batch, query_distances
from gam.files import hold_lock
from gam.models.lm import LMConfig


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_targets_only_at_queries_and_equal_to_paired_value(random_non_queries):
    b, t, p, v = 16, 64, 8, 64
    x, y = make_mqar_batch(b, t, p, v, seed=3, random_non_queries=random_non_queries)
    assert x.shape == y.shape == (b, t) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < v
    for row in range(b):
        keys, values = x[row, 0:2 * p:2], x[row, 1:2 * p:2]
        assert len(set(keys.tolist())) == p and len(set(values.tolist())) == p
        assert all(1 <= k < v // 2 for k in keys.tolist())
        assert all(v // 2 <= val < v for val in values.tolist())
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        query_pos = (y[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(query_pos) == p
        assert all(q >= 2 * p and (q - 2 * p) % 2 == 0 for q in query_pos)
        queried = [x[row, q].item() for q in query_pos]
        assert sorted(queried) == sorted(keys.tolist())  # every key exactly once
        for q in query_pos:
            assert y[row, q].item() == pairs[x[row, q].item()]
        assert (y[row, : 2 * p] == IGNORE_INDEX).all()


def test_mqar_is_deterministic_and_validates():
    a = make_mqar_batch(4, 32, 4, 32, seed=7)
    b = make_mqar_batch(4, 32, 4, 32, seed=7)
    c = make_mqar_batch(4, 32, 4, 32, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError):
        make_mqar_batch(2, 15, 4, 64)  # needs seq_len >= 4 * pairs
    with pytest.raises(ValueError):
        make_mqar_batch(2, 64, 8, 16)  # only 7 keys in a vocab of 16
    x, y = make_mqar_batch(2, 64, 4, 64, seed=0, power_a=0.01)
    assert int((y != IGNORE_INDEX).sum()) == 8


def test_query_distances():
    x, y = make_mqar_batch(8, 64, 8, 64, seed=1)
    d = query_distances(x, y, 8)
    rows, pos = torch.nonzero(y != IGNORE_INDEX, as_tuple=True)
    for dist, r, q in zip(d.tolist(), rows.tolist(), pos.tolist(), strict=True):
        assert x[r, q - dist].item() == x[r, q].item()  # the key in the context
        assert x[r, q - dist + 1].item() == y[r, q].item()  # followed by its value
        assert dist >= 2


def _quick(out_dir, *extra):
    return ["recall", "--quick", "--in-process", "--threads", "1", "--device", "cpu",
            "--out", str(out_dir), *extra]


def test_recall_smoke_sweeps_lrs_and_resumes(out_dir, check):
    models = ["gam", TEXTBOOK, "transformer:init=gpt2,tie_embeddings=false"]
    assert main(_quick(out_dir, "--models", *models)) == 0
    results = check.load_results(out_dir)
    check.assert_environment(results)
    lrs = results["settings"]["lrs"]
    configs = results["configs"]
    assert len(configs) == len(models) * len(lrs) and len(lrs) >= 2
    assert all(c["status"] == "ok" and c["action"] == "trained" for c in configs)
    runs = results["runs"]
    assert sorted({(r["model"], r["num_kv_pairs"]) for r in runs}) == sorted(
        (m, p) for m in models for p in (2, 4))  # T 32: the pair counts with 8P <= 32
    for r in runs:
        group = [c for c in configs if c["model"] == r["model"]]
        best = max(c["val_accuracy"] for c in group)
        chosen = [c for c in group if c["chosen"]]
        assert len(chosen) == 1 and chosen[0]["lr"] == r["lr"]
        assert chosen[0]["val_accuracy"] == best  # picked on validation, not on test
        assert r["accuracy"] == chosen[0]["pairs"][str(r["num_kv_pairs"])]["accuracy"]
        assert r["copy_plateau"] == pytest.approx(1 / r["num_kv_pairs"])
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["reachable_fraction"] <= 1.0
    rf = {r["model"]: r["receptive_field"] for r in runs}
    assert rf == {"gam": 1 + 2 * (3 - 1), TEXTBOOK: 32, models[2]: 32}
    assert {r["model"]: (r["init"], r["tied"]) for r in runs}[models[2]] == ("gpt2", "no")
    gam_reach = [r["reachable_fraction"] for r in runs if r["model"] == "gam"]
    assert all(f < 1.0 for f in gam_reach)
    assert all(r["reachable_fraction"] == 1.0 for r in runs if r["model"] != "gam")
    check.assert_png(out_dir / "recall.png")
    md = (out_dir / "results.md").read_text()
    assert "copy plateau" in md and "reachable (rf 5)" in md and "sweep" in md
    # the same command again trains nothing and reports the same numbers
    assert main(_quick(out_dir, "--models", *models)) == 0
    again = check.load_results(out_dir)
    assert all(c["action"] == "reused" for c in again["configs"])
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in runs]
    # other settings are not reused
    assert main(_quick(out_dir, "--models", "gam", "--lrs", "3e-3", "--steps", "5")) == 0
    assert [c["action"] for c in check.load_results(out_dir)["configs"]] == ["trained"]


def test_recall_trains_each_configuration_in_a_worker(out_dir, check):
    code = main(["recall", "--quick", "--models", TEXTBOOK, "--lrs", "1e-2", "--steps", "5",
                 "--eval-every", "2", "--threads", "1", "--device", "cpu", "--out",
                 str(out_dir)])
    assert code == 0
    (config,) = check.load_results(out_dir)["configs"]
    assert config["status"] == "ok" and config["action"] == "trained", config
    saved = json.loads((out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.01.json").read_text())
    assert saved["key"]["lr"] == 0.01 and saved["steps"] == 5
    assert "step 5" in (out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.01.log").read_text()
    assert not list((out_dir / "configs").glob("*.ckpt"))  # removed once finished


def test_power_a_places_queries_soon_after_the_pairs_and_is_its_own_configuration(out_dir,
                                                                                 check):
    uniform = query_distances(*make_mqar_batch(256, 256, 16, 128, seed=0), 16).float()
    power = query_distances(*make_mqar_batch(256, 256, 16, 128, seed=0, power_a=0.01),
                            16).float()
    assert float(power.mean()) < 0.6 * float(uniform.mean())
    base = PROTOCOL
    assert "query_power_a" not in protocol_key(base)  # keys of older runs stay valid
    assert protocol_key(replace(base, query_power_a=0.01))["query_power_a"] == 0.01
    args = ["--models", "gam", "--lrs", "1e-2", "--steps", "3"]
    assert main(_quick(out_dir, *args)) == 0
    assert main(_quick(out_dir, *args, "--power-a", "0.01")) == 0
    (config,) = check.load_results(out_dir)["configs"]
    assert config["action"] == "trained"  # not the uniform one's result
    assert "power law" in (out_dir / "results.md").read_text()
    with pytest.raises(ValueError, match="--power-a must be in"):
        main(_quick(out_dir, *args, "--power-a", "0"))


def test_a_configuration_another_process_trains_is_skipped_untouched(out_dir, check):
    args = ["--models", TEXTBOOK, "--lrs", "1e-2", "--steps", "3"]
    log = out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.01.log"
    log.parent.mkdir(parents=True)
    log.write_text("the other process's progress\n")
    with hold_lock(log.with_suffix(".lock")):  # held as the other process would
        assert main(_quick(out_dir, *args)) == 0
        (config,) = check.load_results(out_dir)["configs"]
        assert config["status"] == "not run" and config["action"] == "skipped"
        assert "another process" in config["error"]
        assert log.read_text() == "the other process's progress\n"
        assert not log.with_suffix(".json").exists()
    assert main(_quick(out_dir, *args)) == 0  # released: trained now
    (config,) = check.load_results(out_dir)["configs"]
    assert config["status"] == "ok" and config["action"] == "trained"


def test_a_bad_model_override_fails_before_training(out_dir):
    with pytest.raises(ValueError, match="unknown setting"):
        main(_quick(out_dir, "--models", "transformer:no_such_field=1"))
    with pytest.raises(ValueError, match="unknown model"):
        main(_quick(out_dir, "--models", "no-such-model"))
    assert not (out_dir / "configs").exists()


def test_parse_variant():
    assert parse_variant("transformer") == ("transformer", {})
    assert parse_variant("transformer:init=gpt2,tie_embeddings=false") == (
        "transformer", {"init": "gpt2", "tie_embeddings": False})
    assert parse_variant("gam:pos_embedding_std=0.02") == ("gam", {"pos_embedding_std": 0.02})
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("transformer:gpt2")


def test_choose_lr_uses_validation_then_fewer_steps():
    def c(lr, val, steps, status="ok"):
        return {"lr": lr, "val_accuracy": val, "steps": steps, "status": status}

    assert choose_lr([c(1e-3, 0.5, 100), c(3e-3, 0.9, 100), c(1e-2, 0.7, 100)])["lr"] == 3e-3
    assert choose_lr([c(1e-3, 1.0, 900), c(3e-3, 1.0, 400)])["lr"] == 3e-3
    assert choose_lr([c(1e-3, 0.2, 100), c(3e-3, None, 0, status="error")])["lr"] == 1e-3
    assert choose_lr([c(1e-3, None, 0, status="timeout")]) is None


PROTOCOL = Protocol(vocab_size=32, d_model=16, n_layers=2, steps=1, tokens_per_step=64,
                    warmup_fraction=0.1, weight_decay=0.1, eval_every=1, val_examples=4,
                    test_examples=4, target_accuracy=0.99, random_filler=True, max_seconds=None)


def test_model_overrides_reach_the_model():
    default = build_recall_model("transformer", {}, 32, PROTOCOL)
    assert default.config.init == LMConfig().init  # the library's default, whatever it is
    tied = default.head.weight is default.token_embedding.weight
    assert tied == LMConfig().tie_embeddings
    m = build_recall_model("transformer", {"init": "gpt2", "tie_embeddings": False}, 32,
                           PROTOCOL)
    assert m.config.init == "gpt2" and m.head.weight is not m.token_embedding.weight
    assert float(m.token_embedding.weight.detach().std()) == pytest.approx(0.02, rel=0.2)
    gam = build_recall_model("gam", {}, 32, PROTOCOL)
    assert gam.config.num_memory_slots == 16 and gam.receptive_field == 5
    delta = build_recall_model("gam-delta", {}, 32, PROTOCOL)
    assert delta.config.delta_chunk_size == 32
    assert build_recall_model("gam-delta", {"delta_chunk_size": 8}, 32,
                              PROTOCOL).config.delta_chunk_size == 8  # an override still wins


def test_textbook_transformer_is_causal_untied_and_unit_scale():
    torch.manual_seed(0)
    m = build_recall_model(TEXTBOOK, {}, 32, PROTOCOL).eval()
    assert m.head.weight is not m.token_embedding.weight
    assert float(m.token_embedding.weight.detach().std()) == pytest.approx(1.0, rel=0.2)
    assert float(m.pos_embedding.detach().std()) == pytest.approx(1.0, rel=0.2)
    x = torch.randint(0, 32, (2, 32))
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 1) % 32
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(x2)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5)  # the future is invisible
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-5)
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, 5] = 3
    _, loss = m(x, y)
    assert loss is not None and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["transformer", "gam-delta"])
def test_an_interrupted_configuration_resumes_to_the_same_numbers(tmp_path, monkeypatch, name):
    from dataclasses import replace

    import gam.bench.recall_training as recall_training

    p = replace(PROTOCOL, steps=12, eval_every=4, target_accuracy=1.01)
    args = (name, {}, 32, [2, 4], 3e-3, p, 0, torch.device("cpu"))
    whole = recall_training.train_config(*args, log=lambda _: None)
    checkpoint, key = tmp_path / "c.ckpt", {"any": "key"}
    real_step, calls = recall_training.train_step, []

    def interrupted(*a, **k):  # the process dies during step 10
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(recall_training, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recall_training.train_config(*args, log=lambda _: None, checkpoint=checkpoint, key=key)
    assert torch.load(checkpoint, weights_only=True)["step"] == 8  # the last validation
    monkeypatch.setattr(recall_training, "train_step", real_step)
    lines = []
    resumed = recall_training.train_config(*args, log=lines.append, checkpoint=checkpoint, key=key)
    assert "resumed at step 8" in lines[0]
    def numbers(result):  # everything but the timings
        return (result["steps"], result["final_loss"], result["pairs"],
                [{k: v for k, v in point.items() if k != "train_seconds"}
                 for point in result["curve"]])

    assert numbers(resumed) == numbers(whole)
    # another configuration's checkpoint is not taken for this one's
    other = recall_training.train_config(*args, log=lines.append, checkpoint=checkpoint,
                                         key={"other": 1})
    assert numbers(other) == numbers(whole) and "resumed" not in lines[-1]


def test_report_only_trains_nothing_and_lists_what_is_missing(out_dir, check):
    base = ["recall", "--quick", "--models", TEXTBOOK, "--steps", "2", "--threads", "1",
            "--device", "cpu", "--in-process", "--out", str(out_dir)]
    assert main(base + ["--lrs", "1e-2"]) == 0
    assert main(base + ["--lrs", "1e-2", "3e-3", "--report-only"]) == 0
    configs = {c["lr"]: c for c in check.load_results(out_dir)["configs"]}
    assert configs[1e-2]["action"] == "reused" and configs[1e-2]["status"] == "ok"
    assert configs[3e-3]["status"] == "not run" and configs[3e-3]["action"] == "skipped"
    assert not (out_dir / "configs" / f"{TEXTBOOK}-T32-lr0.003.json").exists()
    with pytest.raises(ValueError, match="contradict"):
        main(base + ["--report-only", "--retrain"])


def test_mix_trains_shorter_cases_beside_and_keeps_older_keys(out_dir, check, monkeypatch):
    import gam.bench.recall_protocol as recall_protocol
    import gam.bench.recall_training as recall_training

    p = replace(PROTOCOL, mix=((16, 2), (64, 4), (16, 1)))
    # only the cases shorter than the configuration's length, one entry per length
    assert recall_protocol.mix_for_length(32, p) == [[16, [1, 2]]]
    assert recall_protocol.mix_for_length(128, p) == [[16, [1, 2]], [64, [4]]]
    assert recall_protocol.mix_for_length(16, p) == []
    assert "mix" not in protocol_key(p)  # a configuration's key carries its own mix
    assert recall_protocol.parse_mix_case("64:4") == (64, 4)
    for bad in ("64", "64:x", "16:4", "8:0"):
        with pytest.raises(Exception, match="64:4|pairs"):
            recall_protocol.parse_mix_case(bad)
    lengths = []
    real_step = recall_training.train_step

    def spy(model, optimizer, xs, ys, **kw):
        lengths.append([x.shape[1] for x in xs])
        return real_step(model, optimizer, xs, ys, **kw)

    monkeypatch.setattr(recall_training, "train_step", spy)
    recall_training.train_config("transformer", {}, 32, [2, 4], 3e-3, replace(p, steps=2), 0,
                        torch.device("cpu"), log=lambda _: None,
                        mix=recall_protocol.mix_for_length(32, p))
    assert lengths == [[32, 16], [32, 16]]  # its own batch, then the shorter one, every step
    monkeypatch.setattr(recall_training, "train_step", real_step)
    # through the command: a mixture is its own configuration; without one the key is the
    # one older runs have (no "mix" entry), so their results are reused
    args = ["--models", "transformer", "--lrs", "1e-2", "--steps", "2"]
    assert main(_quick(out_dir, *args)) == 0
    (cfile,) = (out_dir / "configs").glob("*.json")
    assert "mix" not in json.loads(cfile.read_text())["key"]
    assert main(_quick(out_dir, *args, "--mix", "16:2")) == 0
    (config,) = check.load_results(out_dir)["configs"]
    assert config["action"] == "trained" and config["mix"] == [[16, [2]]]
    assert json.loads(cfile.read_text())["key"]["mix"] == [[16, [2]]]
    assert "16 x 2" in (out_dir / "results.md").read_text()
