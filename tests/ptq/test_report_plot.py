"""The PTQ report's plot (ptq/report_plot.py): the figure, its PNG file and bytes, as the report's methods give them."""

from __future__ import annotations

from flatq_lightning.ptq import report_plot
from tests.ptq.test_report import _report

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_accuracy_png(tmp_path):
    p = _report().plot_accuracy(tmp_path / "sub" / "ptq_accuracy.png")
    assert p.read_bytes()[:8] == PNG
    assert _report().plot_accuracy(tmp_path).name == "ptq_accuracy.png"
    files = _report().write(tmp_path / "all")
    assert sorted(p.name for p in files.values()) == ["ptq_report.csv", "ptq_report.json", "ptq_report.md", "ptq_report.png"]
    assert files["png"].read_bytes()[:8] == PNG


def test_figure_shows_every_bit_width_and_the_fp_lines():
    rep = _report()
    fig = report_plot.accuracy_figure(rep)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == rep.bits
    assert [line.get_label() for line in ax.get_lines()] == ["top-1", "top-5", "FP top-1 (92.0)", "FP top-5 (99.0)"]
    assert list(ax.get_lines()[0].get_ydata()) == [r.top1 for r in rep.rows]
    assert ax.get_ylim() == (0.0, 100.0)
    assert rep.png_bytes()[:8] == report_plot.png_bytes(rep)[:8] == PNG
