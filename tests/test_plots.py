"""The figures of effir: every text inside the figure, none on top of another."""

import pytest

from effir import plots

POINTS = {"EffiR (drop + slim)": ({"query": {"speedup": 1.45}, "document": {"speedup": 1.44}}, 0.623),
          "full model, fine-tuned": ({"query": {"speedup": 1.0}, "document": {"speedup": 1.0}}, 0.689),
          "Drop-8B (blocks, auto)": ({"query": {"speedup": 1.52}, "document": {"speedup": 1.50}}, 0.431),
          "Drop-15M (MLP only)": ({"query": {"speedup": 1.31}, "document": {"speedup": 1.29}}, 0.652)}


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """The matplotlib figure a plot function saves, its renderer, and its titles, annotations and legend texts."""
    saved = {}
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (saved.setdefault("fig", fig), real(fig, path))[1])

    def draw(fn, *args):
        fn(*args, tmp_path / "plot.png")
        fig = saved["fig"]
        renderer = fig.canvas.get_renderer()
        texts = [t for ax in fig.axes for t in (ax.title, *ax.texts)]  # titles and annotations
        texts += [t for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
                  for t in legend.get_texts()]
        texts = [t for t in texts if t.get_visible() and t.get_text().strip()]
        return fig, renderer, texts

    return draw


def test_quality_speed_labels_are_inside_and_clear_of_the_titles(drawn):
    fig, renderer, texts = drawn(plots.quality_speed_plot, POINTS)
    page = fig.bbox
    for t in texts:
        box = t.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, t.get_text()
    shown = [t.get_text() for t in texts]
    for label in POINTS:
        assert shown.count(label) >= 1, label
    titles = [ax.title for ax in fig.axes]
    labels = [t for t in texts if t.get_text() in POINTS]
    for title in titles:
        for t in labels:
            assert not title.get_window_extent(renderer).overlaps(t.get_window_extent(renderer)), t.get_text()
