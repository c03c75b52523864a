"""Settings a CUDA run depends on, checked on the CPU: TF32 (gam.runtime), the CUDA RNG state
of checkpoints (the current device's only), the profiler's activities, ``gam env`` and the
kernel table every benchmark's results.json records."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity

from gam import runtime
from gam.bench.common import setup
from gam.bench.environment import environment
from gam.bench.profile_step import profiler_activities
from gam.cli import build_parser
from gam.cli import main as gam_main
from gam.training import checkpoint


@pytest.fixture
def restore_precision():
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_tf32_is_set_for_cuda_only(monkeypatch, restore_precision):
    monkeypatch.delenv(runtime.TF32_ENV, raising=False)
    assert runtime.set_tf32("cpu") is None
    assert runtime.set_tf32(torch.device("cuda", 0)) is True  # the default: on
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and runtime.tf32_enabled()
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert runtime.set_tf32("cuda", False) is False
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not runtime.tf32_enabled()
    monkeypatch.setenv(runtime.TF32_ENV, "0")
    assert runtime.set_tf32("cuda") is False
    assert runtime.set_tf32("cuda", True) is True  # an explicit choice beats the variable


def test_tf32_options(monkeypatch):
    args = build_parser().parse_args(["train", "--no-tf32"])
    assert args.tf32 is False
    assert build_parser().parse_args(["train"]).tf32 is None
    monkeypatch.delenv(runtime.TF32_ENV, raising=False)
    ns = type("A", (), dict(device="cpu", threads=1, tf32=False, command="scale", argv=[]))()
    device, _, _, env = setup(ns)
    assert os.environ[runtime.TF32_ENV] == "0"  # inherited by the worker processes
    assert env["tf32"] is None and device.type == "cpu"  # no effect on a CPU, recorded so
    monkeypatch.delenv(runtime.TF32_ENV)


def test_environment_records_the_kernel_of_every_family():
    env = environment("cpu", threads=1)
    table = env["kernels"]
    from gam.models.registry import MODELS

    assert table["device_type"] == "cpu" and set(table["families"]) == set(MODELS)
    assert set(table["families"]["mamba"]) >= {"causal_conv_silu", "selective_scan"}
    assert set(table["families"]["gam-delta"]) >= {"causal_conv_silu", "delta_rule"}
    assert table["families"]["gam-delta"]["delta_rule"] == {"fp32": "torch", "bf16": "torch"}
    json.dumps(env)  # results.json takes it as is


def test_gam_env_prints_the_table(capsys):
    assert gam_main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch: " in out and "kernels on cpu" in out and "selective_scan" in out
    assert gam_main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "cpu" in report["kernels"] and report["facts"]["tf32_default_on_cuda"] in (True, False)


def test_checkpoint_saves_and_restores_only_the_current_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: calls.append(("one", s)))
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: calls.append(("all",)))
    state = checkpoint.capture_rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    checkpoint.restore_rng_state(state)
    assert calls == [("one", state["cuda"])]
    # a checkpoint of an older gam holds every visible GPU's state: only ours is restored
    calls.clear()
    old = dict(state, cuda=[torch.tensor([1], dtype=torch.uint8),
                            torch.tensor([2], dtype=torch.uint8)])
    checkpoint.restore_rng_state(old)
    assert len(calls) == 1 and calls[0][0] == "one" and int(calls[0][1][0]) == 2


def test_profiler_records_the_gpu_on_cuda():
    assert profiler_activities(torch.device("cpu")) == ([ProfilerActivity.CPU],
                                                        "self_cpu_time_total")
    activities, sort = profiler_activities(torch.device("cuda", 0))
    assert ProfilerActivity.CUDA in activities and sort == "self_cuda_time_total"
    assert sys.modules["gam.bench.profile_step"] is not None


def test_the_gpu_script_parses():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / ".ci" / "gpu"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for command in ("bench scale", "bench throughput", "bench decode", "-m cuda", "env"):
        assert command in text
