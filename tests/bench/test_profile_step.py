"""python -m gam.bench.profile_step prints the operator table of a training step."""

import torch

from gam.bench import profile_step


def test_profile_step_prints_operator_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert profile_step.main(["gam", "fp32", "tiny"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out
