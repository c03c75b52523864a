"""Generating past max_seq_len drops the oldest tokens: the library says so, once per call."""

from __future__ import annotations

import warnings

import pytest
import torch

import gam


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gam.build_model("gam", "tiny").eval()  # max_seq_len 64


def _warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "max_seq_len" in str(w.message)]


def test_no_warning_inside_the_window(model):
    idx = torch.zeros(1, 10, dtype=torch.long)
    assert _warnings(lambda: model.generate(idx, 54, seed=0)) == []


@pytest.mark.parametrize("prompt, new, expected", [(60, 20, 1), (64, 1, 0), (64, 2, 1),
                                                   (1, 200, 1)])
def test_one_warning_per_call_past_the_window(model, prompt, new, expected):
    idx = torch.zeros(1, prompt, dtype=torch.long)
    messages = _warnings(lambda: model.generate(idx, new, seed=0))
    assert len(messages) == expected
    assert all("oldest tokens are dropped" in m and "64" in m for m in messages)
    # a second call warns again (once per call, not once per process)
    assert len(_warnings(lambda: model.generate(idx, new, seed=0))) == expected


def test_the_stream_warns_once_too(model):
    idx = torch.zeros(1, 60, dtype=torch.long)
    assert len(_warnings(lambda: list(model.generate_stream(idx, 30, seed=0)))) == 1
