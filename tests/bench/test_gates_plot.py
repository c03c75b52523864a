"""The gates-evolution plot keeps a layer's local and global lines apart (one panel each)."""

from __future__ import annotations

from gam.bench import common, gates


def test_evolution_plot_has_one_panel_per_path(tmp_path, monkeypatch, check):
    figures = []
    new_figure = common.new_figure

    def spy(*args, **kwargs):
        fig, axes = new_figure(*args, **kwargs)
        figures.append((fig, axes))
        return fig, axes

    monkeypatch.setattr(common, "new_figure", spy)
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
