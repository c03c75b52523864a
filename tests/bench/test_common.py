import argparse
import math

import pytest
import torch

from gam.bench import COMMANDS, main
from gam.bench.environment import environment
from gam.bench.measure import MemoryMeter, loglog_fit
from gam.bench.reports import fmt, markdown_table, write_results
from gam.runtime import resolve_device


def test_loglog_fit_recovers_known_exponent():
    xs = [256, 512, 1024, 2048, 4096]
    slope, intercept = loglog_fit(xs, [3.0 * x ** 1.7 for x in xs])
    assert slope == pytest.approx(1.7, abs=1e-9)
    assert intercept == pytest.approx(math.log(3.0), abs=1e-9)
    # multiplicative noise that is symmetric around the line leaves the slope unchanged
    noisy = [3.0 * x ** 1.3 * (1.1 if i % 2 else 1 / 1.1) for i, x in enumerate(xs[:4])]
    assert loglog_fit(xs[:4], noisy)[0] == pytest.approx(1.3, abs=0.15)


def test_loglog_fit_needs_two_points():
    assert loglog_fit([256], [1.0]) is None
    assert loglog_fit([256, 512], [1.0, None]) is None
    assert loglog_fit([], []) is None


def test_markdown_table_and_strict_json(tmp_path):
    table = markdown_table(["a", "b"], [[1, fmt(2.345, 2)], ["x", fmt(None)]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.35 |", "| x | - |"]
    out = write_results(tmp_path, {"x": float("nan"), "y": [float("inf"), 1.0]}, "# t")
    text = (out / "results.json").read_text()
    assert "NaN" not in text and '"x": null' in text
    assert (out / "results.md").read_text() == "# t\n"


def test_memory_meter_sees_a_large_allocation():
    meter = MemoryMeter("cpu")
    meter.start()
    x = torch.ones(16 * 2**20)  # 64 MB, touched
    grown = meter.growth_bytes()
    del x
    assert grown >= 48 * 2**20


def test_environment_fields():
    env = environment(torch.device("cpu"), 1)
    assert env["threads"] == 1 and env["device"] == "cpu"
    assert env["torch"] == torch.__version__
    assert isinstance(env["cpu_model"], str) and env["cpu_model"]


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError):
            resolve_device("cuda")


def test_dispatcher_lists_commands(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("scale", "decode", "recall", "throughput", "compare", "ablate", "gates"):
        assert name in text and name in COMMANDS
    assert main([]) == 2


def test_dispatcher_unknown_and_missing_commands(capsys, monkeypatch):
    assert main(["no-such-command"]) == 2
    assert "unknown bench command" in capsys.readouterr().err
    monkeypatch.setitem(COMMANDS, "later", ("gam.bench._not_written_yet", "added later"))
    assert main(["later"]) == 2
    err = capsys.readouterr().err
    assert "gam.bench._not_written_yet" in err and "not available" in err


def test_dispatcher_adds_common_options(monkeypatch):
    import sys
    import types

    seen = {}
    module = types.ModuleType("gam.bench._fake")
    module.add_arguments = lambda parser: parser.add_argument("--size", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        seen.update(vars(args))
        return 0

    module.run = run
    monkeypatch.setitem(sys.modules, "gam.bench._fake", module)
    monkeypatch.setitem(COMMANDS, "fake", ("gam.bench._fake", "a test command"))
    assert main(["fake", "--size", "3", "--quick", "--threads", "1"]) == 0
    assert seen["size"] == 3 and seen["quick"] and seen["threads"] == 1
    assert seen["device"] == "auto" and seen["command"] == "fake"
    assert seen["argv"] == ["--size", "3", "--quick", "--threads", "1"]
    assert main(["fake", "--bad-option"]) == 2
