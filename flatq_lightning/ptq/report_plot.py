"""The PTQ report's plot: top-1/top-5 accuracy per bit-width as a matplotlib figure, a PNG file or bytes, and the
image sent to the Lightning loggers that take images.

:class:`~flatq_lightning.ptq.report.PTQReport` exposes these as its methods ``figure``, ``png_bytes``,
``plot_accuracy`` and ``log_to``; every function here renders through ``report.figure()``. ``report`` is typed
``Any`` here: this module does not import :mod:`.report` (which imports it).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from ..utils.io import _temp_beside

__all__ = ["accuracy_figure", "log_image", "png_bytes", "save_accuracy_plot"]

PathLike = str | os.PathLike


def accuracy_figure(report: Any) -> Any:
    """The accuracy-vs-bit-width plot as a matplotlib ``Figure`` (Agg canvas; for loggers and files)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.1 * len(report.rows) + 2.0), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(report.rows)))
    ax.plot(xs, [r.top1 for r in report.rows], "o-", color="C0", label="top-1")
    ax.plot(xs, [r.top5 for r in report.rows], "s--", color="C1", label=f"top-{report.top5_k}")
    ax.axhline(report.fp_top1, color="C0", lw=1, alpha=0.6, label=f"FP top-1 ({report.fp_top1:.1f})")
    ax.axhline(report.fp_top5, color="C1", lw=1, ls=":", alpha=0.6, label=f"FP top-{report.top5_k} ({report.fp_top5:.1f})")
    ax.set_xticks(xs)
    ax.set_xticklabels(report.bits)
    ax.set_xlabel("bit-width")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def png_bytes(report: Any) -> bytes:
    """The accuracy plot as PNG bytes (what :meth:`PTQReport.write` saves as ``ptq_report.png``)."""
    buf = io.BytesIO()
    report.figure().savefig(buf, dpi=120, format="png")
    return buf.getvalue()


def save_accuracy_plot(report: Any, path: PathLike = "ptq_accuracy.png") -> Path:
    """Top-1/top-5 vs bit-width (requested order), FP as horizontal lines; a PNG via the Agg canvas.

    A directory ``path`` gets ``ptq_accuracy.png`` inside it. Written atomically (temporary file, then
    ``os.replace``). Returns the file written.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "ptq_accuracy.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(p)
    try:
        report.figure().savefig(tmp, dpi=120, format="png")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def log_image(
    logger: Any, key: str, report: Any, png: bytes | None, path: PathLike | None, step: int
) -> bytes | None:
    """The plot to one logger, if it takes images (TensorBoard ``add_image``, MLflow artifacts of ``path``, any
    logger with ``log_image`` such as W&B); returns the PNG bytes, rendered at most once over the loggers."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    def image() -> Any:
        import numpy as np
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    if isinstance(logger, TensorBoardLogger):
        png = png or report.png_bytes()
        logger.experiment.add_image(key, image(), global_step=step, dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        if path is None:
            return png
        logger.experiment.log_artifact(logger.run_id, str(path))
    elif callable(getattr(logger, "log_image", None)):  # W&B, Neptune, Comet, ...
        png = png or report.png_bytes()
        logger.log_image(key=key, images=[image()], step=step)
    return png
