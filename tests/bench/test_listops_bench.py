import numpy as np
import pytest
import torch

from gam.bench import main
from gam.bench.listops import ListOpsClassifier, epoch_batches
from gam.data.listops import VOCAB_SIZE
from gam.models.registry import build_model


def test_readout_ignores_right_padding():
    torch.manual_seed(0)
    model = ListOpsClassifier(build_model("transformer", "tiny", vocab_size=VOCAB_SIZE,
                                          max_seq_len=16)).eval()
    x = torch.randint(1, VOCAB_SIZE, (1, 10))
    padded = torch.cat([x, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    n = torch.tensor([10])
    assert torch.allclose(model(x, n), model(padded, n), atol=1e-5)


def test_mean_readout_averages_the_real_tokens_only():
    torch.manual_seed(0)
    backbone = build_model("s4d", "tiny", vocab_size=VOCAB_SIZE, max_seq_len=16)
    model = ListOpsClassifier(backbone, readout="mean").eval()
    x = torch.randint(1, VOCAB_SIZE, (2, 16))
    n = torch.tensor([10, 16])
    with torch.no_grad():
        h, _ = backbone.hidden_states(x)
        expected = torch.stack([h[0, :10].mean(0), h[1].mean(0)])
        assert torch.allclose(model(x, n), model.classifier(expected), atol=1e-5)
        x[0, 10:] = 0  # padding after the real tokens changes nothing
        assert torch.allclose(model(x, n), model.classifier(expected), atol=1e-5)
    with pytest.raises(ValueError, match="readout"):
        ListOpsClassifier(backbone, readout="max")


def test_readout_enters_the_run_key_only_when_not_the_default():
    """Records written before the readout option keep matching the default protocol."""
    from dataclasses import asdict, replace

    from gam.bench.listops import PROTOCOLS, protocol_key

    cpu = PROTOCOLS["cpu"]
    old_key = {k: v for k, v in asdict(cpu).items() if k != "readout"}
    assert cpu.readout == "last" and protocol_key(cpu) == old_key
    assert protocol_key(replace(cpu, readout="mean")) == {**old_key, "readout": "mean"}


def test_epoch_batches_cover_the_split_once():
    lengths = np.random.default_rng(0).integers(10, 100, size=330)
    batches = epoch_batches(lengths, 16, np.random.default_rng(1), bucket=4)
    rows = np.concatenate(batches)
    assert all(len(b) == 16 for b in batches)
    assert len(rows) == len(set(rows.tolist())) == 320  # full batches only, no repeats


def test_listops_bench_quick(out_dir, check, tmp_path, monkeypatch):
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))  # inherited by the workers
    # one worker process (the slow part: it imports torch); the readout is tested above
    args = ["listops", "--quick", "--models", "gam", "--seeds", "0",
            "--d-model", "16", "--steps", "6", "--eval-every", "3", "--threads", "1",
            "--device", "cpu", "--out", str(out_dir)]
    assert main(args) == 0
    res = check.load_results(out_dir)
    check.assert_environment(res)
    check.assert_png(out_dir / "listops.png")
    assert "listops" in (out_dir / "results.md").read_text()
    assert res["settings"]["protocol"]["d_model"] == 16
    assert 0 < res["data"]["majority_test"] <= 1
    assert res["data"]["cache"].startswith("listops-") and "/" not in res["data"]["cache"]
    assert len(res["runs"]) == 1
    for r in res["runs"]:
        assert r["status"] == "ok", r.get("error")
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["test_accuracy_final"] <= 1
        assert r["parameters"] > 0 and r["tokens_per_s"] > 0
        assert [c["step"] for c in r["curve"]] == [3, 6]
        assert (out_dir / "runs" / f"{r['model']}-seed0.json").is_file()
    assert res["runs"][0]["receptive_field"] == 3  # 1 layer, kernel 3
    assert res["summary"][0]["model"] == "gam"
    # the same command again reuses the finished runs
    assert main(args) == 0
    assert {r["action"] for r in check.load_results(out_dir)["runs"]} == {"reused"}
    # --report-only trains nothing: the finished seed is reported, the other listed as not run
    seeds = args.index("--seeds") + 1
    assert main(args[:seeds] + ["0", "1"] + args[seeds + 1:] + ["--report-only"]) == 0
    runs = check.load_results(out_dir)["runs"]
    assert [(r["seed"], r["status"], r["action"]) for r in runs] == [
        (0, "ok", "reused"), (1, "not run", "skipped")]
    assert not (out_dir / "runs" / "gam-seed1.json").exists()
    assert "not run" in (out_dir / "results.md").read_text()
    with pytest.raises(ValueError, match="contradict"):
        main(args + ["--report-only", "--retrain"])


def test_run_key_follows_the_model_config():
    from gam.bench.listops import PROTOCOLS, backbone_config

    QUICK = PROTOCOLS["quick"]

    plain, paper = backbone_config("gam", QUICK), backbone_config("gam", QUICK, {"init": "paper"})
    assert plain["init"] != paper["init"] and paper["tie_embeddings"] is True
    assert backbone_config("gam", QUICK, {}) == plain  # the same settings, the same key


def test_listops_bench_rejects_unknown_model(out_dir):
    with pytest.raises(ValueError, match="unknown model"):
        main(["listops", "--quick", "--models", "nope", "--out", str(out_dir)])


def test_learned_positions_only_for_families_that_have_them():
    """The protocol's learned positions go to GAM, the Transformer and Mamba only: a rotary,
    convolutional or recurrent family keeps its own design (and S4D gets the S4D paper's N 64)."""
    from gam.bench.listops import PROTOCOLS, backbone_config

    cpu = PROTOCOLS["cpu"]
    assert cpu.pos_embedding_std > 0
    for name in ("gam", "transformer", "mamba", "gam-delta"):
        assert backbone_config(name, cpu)["pos_embedding"] is True, name
    for name in ("transformer-pp", "s4d", "gated-deltanet", "rwkv7"):
        config = backbone_config(name, cpu)
        assert config["pos_embedding"] is False, name
    assert backbone_config("s4d", cpu)["state_size"] == 64
    for name in ("gam-delta", "gated-deltanet", "gated-deltanet-matched"):  # small heads at d 64
        assert backbone_config(name, cpu)["delta_chunk_size"] == 32, name
    assert "delta_chunk_size" not in backbone_config("transformer", cpu)
