"""The gates-evolution plot keeps a layer's local and global lines apart (one panel each)."""

from __future__ import annotations

import pytest

from gam.bench import gates, reports


def test_evolution_plot_has_one_panel_per_path(tmp_path, monkeypatch, check):
    figures = []
    new_figure = reports.new_figure

    def spy(*args, **kwargs):
        fig, axes = new_figure(*args, **kwargs)
        figures.append((fig, axes))
        return fig, axes

    monkeypatch.setattr(gates, "new_figure", spy)
    evo = [{"step": s, "gates": [{"layer": i, "local_mean": 0.5, "global_mean": 0.5}
                                 for i in range(2)]} for s in (10, 20, 30)]
    path = gates.plot_evolution({"evolution": evo}, tmp_path / "evo.png", "t")
    check.assert_png(path)
    (fig, axes), = figures
    assert [ax.get_title() for ax in axes] == ["sigmoid(g_local)", "sigmoid(g_global)"]
    for ax, style, marker in zip(axes, ("-", "--"), ("o", "s"), strict=True):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["layer 0", "layer 1"]
        assert {line.get_linestyle() for line in lines} == {style}
        assert {line.get_marker() for line in lines} == {marker}
    # the same layer keeps its colour in both panels
    assert [x.get_color() for x in axes[0].get_lines()] == \
        [x.get_color() for x in axes[1].get_lines()]


def test_evolution_plot_without_records_is_skipped(tmp_path):
    assert gates.plot_evolution({"evolution": []}, tmp_path / "none.png", "t") is None


def test_gate_paths_come_from_the_family():
    import torch

    from gam import build_model
    from gam.training.diagnostics import gate_statistics

    assert gates.gated_paths("gam-delta", {"d_model": 32, "n_layers": 2}) == [
        "local", "global", "delta"]
    assert gates.gated_paths("gam-sum", {}) == [] and gates.gated_paths("transformer", {}) == []
    assert gates.gated_paths("no-such-model", {}) == []
    with pytest.raises(ValueError, match="does not build a 'gam' model"):
        gates.gated_paths("gam", {"d_model": -1})
    model = build_model("gam-delta", "tiny").eval()
    stats = gate_statistics(model, [torch.randint(0, 256, (2, 16))])
    assert len(stats) == 2 and {"delta_mean", "global_mean", "local_mean"} <= set(stats[0])
    assert gates.logged_paths(stats) == ["local", "global", "delta"]


def test_a_run_whose_model_config_does_not_build_is_named(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(
        {"model": "gam", "model_config": {"d_model": -1}}))
    with pytest.raises(ValueError, match=r"config.*does not build a 'gam' model.*d_model"):
        gates.check_gated_run(tmp_path)
