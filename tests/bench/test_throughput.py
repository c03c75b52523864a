import pytest

from gam.bench import main


def test_throughput_smoke(out_dir, check):
    code = main(["throughput", "--preset", "tiny", "--models", "gam", "transformer",
                 "--dtype", "bf16", "--seq-len", "16", "--batch-size", "2",
                 "--steps", "1", "--warmup", "0", "--matmul-size", "64", "--threads", "1",
                 "--device", "cpu", "--out", str(out_dir)])
    assert code == 0
    results = check.load_results(out_dir)
    check.assert_environment(results)
    runs = results["runs"]
    assert len(runs) == 2
    for r in runs:
        assert r["status"] == "ok", r
        for key in ("model", "dtype", "seq_len", "batch_size", "tokens_per_s",
                    "flops_per_token", "peak_flops", "mfu", "compile"):
            assert key in r and r[key] is not None, key
        assert r["mfu"] > 0 and r["peak_flops"] > 0
        assert r["optimizer"] == "AdamW (fused)"  # the optimizer gam train builds
        assert isinstance(r["malloc_tuned"], bool)
    ratios = results["ratios"]
    assert [r["dtype"] for r in ratios] == ["bf16"]
    for r in ratios:
        assert r["tokens_per_s_ratio"] > 0 and r["inverse_flops_ratio"] > 0
        # halving the Transformer's attention FLOPs lowers its FLOPs, so the ratio too
        assert 0 < r["inverse_flops_ratio_causal"] < r["inverse_flops_ratio"]
    check.assert_png(out_dir / "throughput.png")


def test_throughput_compile_smoke(out_dir, check):
    """--compile goes through torch.compile in the worker and still reports a run."""
    code = main(["throughput", "--preset", "tiny", "--models", "gam", "--dtype", "fp32",
                 "--seq-len", "16", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                 "--matmul-size", "64", "--threads", "1", "--device", "cpu", "--compile",
                 "--out", str(out_dir)])
    assert code == 0
    (run,) = check.load_results(out_dir)["runs"]
    assert run["status"] == "ok", run
    assert run["compile"] is True and run["tokens_per_s"] > 0


def test_throughput_model_arg_changes_the_model_timed(out_dir, check):
    """--model-arg reaches the timed model: more memory slots, more parameters and FLOPs."""
    def measure(*extra):
        out = out_dir / "-".join(extra or ("default",))
        assert main(["throughput", "--preset", "tiny", "--models", "gam", "--seq-len", "16",
                     "--batch-size", "2", "--steps", "1", "--warmup", "0",
                     "--matmul-size", "64", "--threads", "1", "--device", "cpu",
                     "--out", str(out), *extra]) == 0
        return check.load_results(out), (out / "results.md").read_text()

    default, _ = measure()
    (results, report) = measure("--model-arg", "num_memory_slots=96")
    assert results["settings"]["overrides"] == {"num_memory_slots": 96}
    assert results["settings"]["model_configs"]["gam"]["num_memory_slots"] == 96
    slots_default = default["settings"]["model_configs"]["gam"]["num_memory_slots"]
    assert slots_default != 96
    (run,), (base,) = results["runs"], default["runs"]
    assert run["status"] == "ok", run
    d_model = results["settings"]["model_configs"]["gam"]["d_model"]
    n_layers = results["settings"]["model_configs"]["gam"]["n_layers"]
    assert run["parameters"] - base["parameters"] == (96 - slots_default) * d_model * n_layers
    assert run["flops_per_token"] > base["flops_per_token"]
    assert "num_memory_slots=96" in report.splitlines()[0]


@pytest.mark.parametrize("command", ["throughput", "decode"])
def test_unknown_model_arg_is_a_one_line_error(command, out_dir, capsys):
    code = main([command, "--preset", "tiny", "--models", "gam", "--device", "cpu",
                 "--model-arg", "num_slots=96", "--out", str(out_dir)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_slots" in err and "num_memory_slots" in err
    assert not (out_dir / "results.json").exists()
