
from gam.bench import main


def test_decode_smoke(out_dir, check):
    models = ["gam", "transformer"]  # one process each; Mamba's decoding is tested in models/
    code = main(["decode", "--preset", "tiny", "--models", *models, "--contexts", "8", "16",
                 "--new-tokens", "2", "--threads", "1", "--device", "cpu",
                 "--out", str(out_dir)])
    assert code == 0
    results = check.load_results(out_dir)
    check.assert_environment(results)
    runs = results["runs"]
    assert len(runs) == 2 * len(models)
    for r in runs:
        assert r["status"] == "ok", r
        for key in ("model", "ctx", "tokens_per_s", "ms_per_token", "prefill_ms", "state_mb",
                    "peak_mem_mb"):
            assert r[key] is not None, key
    # the transformer's KV cache grows with the context, GAM's state does not
    state = {(r["model"], r["ctx"]): r["state_mb"] for r in runs}
    assert state[("transformer", 16)] == 2 * state[("transformer", 8)]
    assert state[("gam", 16)] == state[("gam", 8)]
    check.assert_png(out_dir / "decode.png")
