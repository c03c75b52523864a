import ctypes.util
import sys

import pytest
import torch

from gam.bench import main
from gam.bench.scale import fit_rows

GLIBC = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None
RUN_KEYS = {"model", "seq_len", "batch_size", "status", "time_ms_median", "time_ms_min",
            "peak_mem_mb"}


def test_scale_smoke(out_dir, check):
    code = main(["scale", "--preset", "tiny", "--models", "gam", "transformer",
                 "--lengths", "32", "64", "--batch-size", "1", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--device", "cpu", "--out", str(out_dir)])
    assert code == 0
    results = check.load_results(out_dir)
    check.assert_environment(results)
    runs = results["runs"]
    assert [(r["model"], r["seq_len"]) for r in runs] == [
        ("gam", 32), ("gam", 64), ("transformer", 32), ("transformer", 64)]
    for r in runs:
        assert RUN_KEYS <= set(r), r
        assert r["status"] == "ok", r
        assert r["time_ms_min"] <= r["time_ms_median"]
        assert r["peak_mem_mb"] >= 0
        assert r["allocator_tuned"] is GLIBC  # the timed runs use gam train's allocator
    assert {f["model"] for f in results["fits"]} == {"gam", "transformer"}
    for f in results["fits"]:
        assert {"exponent_time", "exponent_time_min", "exponent_memory"} <= set(f)
        assert f["exponent_time"] is not None
    check.assert_png(out_dir / "scale.png")
    assert "Scaling exponents" in (out_dir / "results.md").read_text()


def test_scale_records_timeout_and_skips_longer_lengths(out_dir, check):
    code = main(["scale", "--preset", "tiny", "--models", "gam", "--lengths", "32", "64",
                 "--batch-size", "1", "--repeats", "1", "--threads", "1", "--device", "cpu",
                 "--max-seconds", "0.2", "--out", str(out_dir)])
    assert code == 0
    runs = check.load_results(out_dir)["runs"]
    assert [r["status"] for r in runs] == ["timeout", "skipped"]
    assert runs[0]["time_ms_median"] is None
    check.assert_png(out_dir / "scale.png")


def test_scale_records_oom(out_dir, check):
    # naive attention at N 2048 needs > 256 MB of scores; the worker may only grow by 32 MB
    code = main(["scale", "--preset", "tiny", "--models", "transformer-naive",
                 "--lengths", "2048", "--batch-size", "4", "--repeats", "1", "--threads", "1",
                 "--device", "cpu", "--max-memory-gb", "0.03", "--out", str(out_dir)])
    assert code == 0
    (run,) = check.load_results(out_dir)["runs"]
    assert run["status"] == "oom", run


def test_fit_rows_on_synthetic_runs():
    runs = [{"model": "m", "seq_len": n, "status": "ok", "time_ms_median": 2e-3 * n ** 2,
             "time_ms_min": 1e-3 * n ** 1.5, "peak_mem_mb": 0.5 * n}
            for n in (256, 512, 1024, 2048)]
    runs.append({"model": "m", "seq_len": 4096, "status": "oom", "time_ms_median": None,
                 "time_ms_min": None, "peak_mem_mb": None})
    (fit,) = fit_rows(runs, ["m"])
    assert abs(fit["exponent_time"] - 2.0) < 1e-9
    assert abs(fit["exponent_time_tail"] - 2.0) < 1e-9
    assert abs(fit["exponent_time_min"] - 1.5) < 1e-9
    assert abs(fit["exponent_memory"] - 1.0) < 1e-9
    assert fit["lengths"] == [256, 512, 1024, 2048]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scale_runs_the_block_under_the_asked_dtype(dtype, monkeypatch):
    """The worker's forward runs under bf16 autocast for --dtype bf16, and not for fp32."""
    from gam.bench import scale

    seen, emitted = [], []
    real_build = scale.build_block

    def recording_build(*args, **kwargs):
        block, dim = real_build(*args, **kwargs)
        block.register_forward_hook(
            lambda m, a, out: seen.append(torch.is_autocast_enabled("cpu")))
        return block, dim

    monkeypatch.setattr(scale, "build_block", recording_build)
    monkeypatch.setattr(scale, "emit", emitted.append)
    monkeypatch.setattr(scale, "limit_address_space", lambda _: None)
    scale._worker({"model": "gam", "preset": "tiny", "seq_len": 32, "batch_size": 1,
                   "device": "cpu", "warmup": 0, "repeats": 1, "dtype": dtype})
    assert seen and all(flag == (dtype == "bf16") for flag in seen)
    assert emitted[0]["status"] == "ok"
