"""What post-training quantization kept: accuracy per bit-width, per-layer SQNR, the layer policy, timing.

:class:`PTQReport` is produced by :func:`flatq_lightning.ptq.runner.run_ptq` (and so by the
``PostTrainingQuantization`` callback and the ``flatq-ptq`` command) and writes itself as JSON, Markdown, CSV
and an accuracy-vs-bit-width plot. Accuracies are percentages (0-100); drops are percentage points
(FP minus quantized, so a positive drop is a loss).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import _temp_beside, free_path, numbered_paths, write_file_atomic
from ..utils.logging import log_hyperparams
from . import report_plot
from .recipe import PTQRecipe

__all__ = [
    "LayerSQNR",
    "PTQRow",
    "PTQReport",
    "REPORT_FORMATS",
    "REPORT_STEM",
    "free_path",
    "log_hyperparams",
    "numbered_paths",
    "report_paths",
    "write_file_atomic",
]

PathLike = str | os.PathLike

#: every PTQ report (the callback, ``flatq-train``, ``flatq-ptq``) is ``ptq_report.{json,md,csv,png}``
REPORT_STEM = "ptq_report"
REPORT_FORMATS: tuple[str, ...] = ("json", "md", "csv", "png")


def report_paths(
    save_dir: PathLike, formats: Sequence[str] = REPORT_FORMATS, overwrite: bool = False
) -> dict[str, Path]:
    """The files a report goes to: ``ptq_report.<fmt>`` in ``save_dir``, or, when any ``ptq_report.*`` file
    exists there and ``overwrite`` is False, the first free numbered set ``ptq_report_2.<fmt>``, …

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> report_paths(d, ("json",))["json"].name
        'ptq_report.json'
        >>> _ = (d / "ptq_report.json").write_text("{}")
        >>> report_paths(d, ("json", "md"))["md"].name, report_paths(d, ("json",), overwrite=True)["json"].name
        ('ptq_report_2.md', 'ptq_report.json')
    """
    return numbered_paths(save_dir, REPORT_STEM, formats, overwrite=overwrite, taken=REPORT_FORMATS)


def _finite_or_none(v: float | None) -> float | None:
    """JSON has no inf/NaN: a side that is exact (or float) is stored as ``null``."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _bits_label(b: int | None) -> str:
    return "fp" if b is None else str(b)


@dataclass
class LayerSQNR:
    """Quantization quality of one layer at one bit-width (``None``: that side stays float).

    ``weight_sqnr_db`` is :attr:`QuantizedLayer.weight_sqnr_db`; ``act_sqnr_db`` compares the layer's input on
    one calibration batch before and after fake-quantization.

    Example:
        >>> LayerSQNR("conv2", 4, 4, 19.5, 21.0).worst_db
        19.5
    """

    name: str
    weight_bits: int | None
    act_bits: int | None
    weight_sqnr_db: float | None
    act_sqnr_db: float | None

    @property
    def worst_db(self) -> float:
        """The lower of the two SQNRs (+inf when neither side is quantized)."""
        vals = [v for v in (self.weight_sqnr_db, self.act_sqnr_db) if v is not None and not math.isnan(v)]
        return min(vals) if vals else math.inf


@dataclass
class PTQRow:
    """One bit-width's result.

    Example:
        >>> r = PTQRow("w4a4", 4, 4, top1=88.0, top5=99.0, drop_top1=3.0, drop_top5=0.5)
        >>> r.bits, r.drop_top1
        ('w4a4', 3.0)
    """

    bits: str
    weight_bits: int
    act_bits: int
    top1: float
    top5: float
    drop_top1: float
    drop_top5: float
    layers: list[LayerSQNR] = field(default_factory=list)
    quantize_seconds: float = 0.0
    eval_seconds: float = 0.0
    #: the BatchNorm statistics were re-estimated for this quantizer before folding (``run_ptq(bn_reestimate=True)``)
    bn_reestimated: bool = False
    #: files written for this bit-width (``run_ptq(export_dir=...)``): ``{"format", "path", "bytes"}`` and, for
    #: ONNX, the parity check against ONNX Runtime (:class:`~flatq_lightning.ptq.onnx_export.OnnxParity` fields)
    exports: list[dict[str, Any]] = field(default_factory=list)
    #: the name of the PTQ recipe that made this row (``PTQReport.recipe`` holds its settings)
    recipe: str = ""
    #: block reconstruction, one entry per block (:class:`~flatq_lightning.quant.reconstruct.BlockResult`
    #: fields: name, kind, layers, iters, seconds, loss_rtn, loss, flipped, weights); empty without it
    reconstruction: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PTQReport:
    """Accuracy of the FP network and of each quantized copy, with per-layer SQNR and the PTQ settings.

    ``top5`` is top-``top5_k`` accuracy, ``top5_k = min(5, num_classes)``.

    Example:
        >>> rep = PTQReport(fp_top1=91.0, fp_top5=99.5, rows=[
        ...     PTQRow("w8a8", 8, 8, 90.9, 99.5, 0.1, 0.0), PTQRow("w4a4", 4, 4, 85.0, 98.0, 6.0, 1.5)])
        >>> rep.row("w4a4").top1
        85.0
        >>> rep.metrics()["ptq/w8a8/top1"]
        90.9
        >>> print(rep.markdown_table().splitlines()[2])
        | w8a8 | 90.90 | 99.50 | 0.10 |
    """

    fp_top1: float
    fp_top5: float
    rows: list[PTQRow] = field(default_factory=list)
    folded_bn_pairs: list[tuple[str, str]] = field(default_factory=list)
    kept_8bit: list[str] = field(default_factory=list)
    keep_first_last_8bit: bool = True
    observer: str = "minmax"
    #: the activation observer (``observer`` is the weight observer)
    act_observer: str = "minmax"
    bn_reestimate: bool = False
    bn_batches: int = 0
    include: list[str] | None = None
    exclude: list[str] | None = None
    calib_batches: int = 0
    calib_batches_requested: int = 0
    num_eval_samples: int = 0
    num_classes: int = 0
    top5_k: int = 5
    device: str = "cpu"
    timing: dict[str, float] = field(default_factory=dict)
    #: the PTQ recipe's settings (:meth:`~flatq_lightning.ptq.recipe.PTQRecipe.to_dict`)
    recipe: dict[str, Any] | None = None
    #: the mixed-precision plan of the ``-mixed`` rows (:meth:`~flatq_lightning.ptq.mixed_precision.MixedPrecisionPlan.to_dict`)
    plan: dict[str, Any] | None = None

    # access -----------------------------------------------------------------------------------------------
    @property
    def bits(self) -> list[str]:
        return [r.bits for r in self.rows]

    def row(self, bits: str) -> PTQRow:
        """The row for ``bits`` (e.g. ``"w4a4"``); ``KeyError`` naming the available ones otherwise."""
        key = bits.strip().lower()
        for r in self.rows:
            if r.bits == key:
                return r
        raise KeyError(f"no PTQ row for {bits!r}; the report has {self.bits}")

    def metrics(self) -> dict[str, float]:
        """Scalars for the Lightning loggers: ``ptq/fp/top1``, ``ptq/fp/top5``, ``ptq/<bits>/top1|top5`` and,
        after block reconstruction, ``ptq/<bits>/recon/<block>/loss|loss_rtn|seconds``."""
        out = {"ptq/fp/top1": self.fp_top1, "ptq/fp/top5": self.fp_top5}
        for r in self.rows:
            out[f"ptq/{r.bits}/top1"] = r.top1
            out[f"ptq/{r.bits}/top5"] = r.top5
            for blk in r.reconstruction:
                for key in ("loss", "loss_rtn", "seconds"):
                    out[f"ptq/{r.bits}/recon/{blk['name']}/{key}"] = float(blk[key])
        return out

    def layer_metrics(self) -> dict[str, float]:
        """Per-layer SQNR for the loggers: ``ptq/<bits>/sqnr_db/<layer>/weight`` and ``.../act`` (finite only)."""
        out: dict[str, float] = {}
        for r in self.rows:
            for layer in r.layers:
                for side, v in (("weight", layer.weight_sqnr_db), ("act", layer.act_sqnr_db)):
                    if v is not None and math.isfinite(v):
                        out[f"ptq/{r.bits}/sqnr_db/{layer.name}/{side}"] = float(v)
        return out

    def settings(self) -> dict[str, Any]:
        """The PTQ settings as flat logger hyperparameters (``ptq/bits``, ``ptq/observer``, …)."""
        recipe: dict[str, Any] = {"ptq/recipe": ""}
        if self.recipe:
            recipe = PTQRecipe.from_dict(self.recipe).settings()  # the report's own values follow
        return {
            "ptq/bits": ",".join(self.bits),
            **recipe,
            "ptq/observer": self.observer,
            "ptq/act_observer": self.act_observer,
            "ptq/bn_reestimate": self.bn_reestimate,
            "ptq/bn_batches": self.bn_batches,
            "ptq/keep_first_last_8bit": self.keep_first_last_8bit,
            "ptq/calib_batches": self.calib_batches,
            "ptq/calib_batches_requested": self.calib_batches_requested,
            "ptq/include": ",".join(self.include) if self.include else "",
            "ptq/exclude": ",".join(self.exclude) if self.exclude else "",
            "ptq/num_eval_samples": self.num_eval_samples,
            "ptq/kept_8bit": ",".join(self.kept_8bit),
        }

    def png_bytes(self) -> bytes:
        """The accuracy plot as PNG bytes (what :meth:`write` saves as ``ptq_report.png``)."""
        return report_plot.png_bytes(self)

    def log_to(self, loggers: Sequence[Any], step: int = 0, image_path: PathLike | None = None) -> None:
        """Send the report to Lightning loggers: settings as hyperparameters, accuracies and per-layer SQNR as
        metrics, and the accuracy plot to every logger that takes images (TensorBoard ``add_image``, loggers
        with ``log_image`` such as W&B, MLflow artifacts). A logger failing on the image only warns.

        Example:
            >>> from lightning.pytorch.loggers import CSVLogger  # doctest: +SKIP
            >>> report.log_to([CSVLogger("logs")], step=trainer.global_step)  # doctest: +SKIP
        """
        loggers = list(loggers)
        if not loggers:
            return
        metrics = {**self.metrics(), **self.layer_metrics()}
        png: bytes | None = None
        for logger in loggers:
            log_hyperparams(logger, self.settings())
            logger.log_metrics(metrics, step=step)
            try:
                png = report_plot.log_image(logger, "ptq/accuracy", self, png, image_path, step)
            except Exception as err:  # an image is not worth losing the run's metrics for
                import warnings

                warnings.warn(f"PTQ plot not sent to {type(logger).__name__}: {err}", stacklevel=2)
            logger.save()

    # serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folded_bn_pairs"] = [list(p) for p in self.folded_bn_pairs]
        for r in d["rows"]:
            for layer in r["layers"]:
                layer["weight_sqnr_db"] = _finite_or_none(layer["weight_sqnr_db"])
                layer["act_sqnr_db"] = _finite_or_none(layer["act_sqnr_db"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PTQReport:
        d = dict(d)
        rows = []
        for r in d.pop("rows", []):
            r = dict(r)
            r["layers"] = [LayerSQNR(**layer) for layer in r.get("layers", [])]
            rows.append(PTQRow(**r))
        d["folded_bn_pairs"] = [tuple(p) for p in d.get("folded_bn_pairs", [])]
        d.setdefault("act_observer", d.get("observer", "minmax"))  # reports before the two observers
        return cls(rows=rows, **d)

    def to_json(self, path: PathLike | None = None) -> str:
        """The report as (strict) JSON; written to ``path`` when given. Non-finite SQNRs become ``null``."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            _write(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: PathLike) -> PTQReport:
        """Read a report written by :meth:`to_json` (a path, or the JSON text itself)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))

    def to_csv(self, path: PathLike | None = None, per_layer: bool = False) -> str:
        """One line per bit-width (FP first); with ``per_layer`` one line per (bit-width, layer) with SQNRs."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if per_layer:
            w.writerow(["bits", "layer", "weight_bits", "act_bits", "weight_sqnr_db", "act_sqnr_db"])
            for r in self.rows:
                for layer in r.layers:
                    w.writerow(
                        [r.bits, layer.name, _bits_label(layer.weight_bits), _bits_label(layer.act_bits),
                         _csv_num(layer.weight_sqnr_db), _csv_num(layer.act_sqnr_db)]
                    )
        else:
            w.writerow(["bits", "weight_bits", "act_bits", "top1", "top5", "drop_top1", "drop_top5",
                        "quantize_seconds", "eval_seconds"])
            w.writerow(["fp", 32, 32, self.fp_top1, self.fp_top5, 0.0, 0.0, 0.0, self.timing.get("fp_eval_s", "")])
            for r in self.rows:
                w.writerow([r.bits, r.weight_bits, r.act_bits, r.top1, r.top5, r.drop_top1, r.drop_top5,
                            round(r.quantize_seconds, 4), round(r.eval_seconds, 4)])
        text = buf.getvalue()
        if path is not None:
            _write(path, text)
        return text

    # human-readable ---------------------------------------------------------------------------------------
    def markdown_table(self) -> str:
        """The accuracy table: one row per bit-width, in the order they were requested."""
        lines = [
            f"| bits | top-1 (%) | top-{self.top5_k} (%) | drop vs FP (top-1, pp) |",
            "|---|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(f"| {r.bits} | {r.top1:.2f} | {r.top5:.2f} | {r.drop_top1:.2f} |")
        return "\n".join(lines)

    def export_table(self) -> str:
        """The exported files, one line each; ONNX files with the parity check against ONNX Runtime (top-1 of
        flatq's fake-quant model and of ONNX Runtime on the same batches, argmax agreement, max |Δ logit|).
        Empty when nothing was exported.

        Example:
            >>> row = PTQRow("w8a8", 8, 8, 90.9, 99.5, 0.1, 0.0, exports=[{"format": "onnx", "path": "q.onnx",
            ...     "bytes": 1_048_576, "samples": 100, "top1_flatq": 91.0, "top1_ort": 91.0, "agreement": 100.0,
            ...     "max_abs_logit_diff": 0.002}])
            >>> print(PTQReport(91.0, 99.5, rows=[row]).export_table().splitlines()[2])
            | w8a8 | onnx | q.onnx | 1.00 MiB | 91.00 | 91.00 | 100.00 | 0.002 | 100 |
        """
        lines = []
        for r in self.rows:
            for e in r.exports:
                if e.get("error"):
                    lines.append(f"| {r.bits} | {e['format']} | {Path(e['path']).name} | failed: {e['error']} |"
                                 + " |" * 5)
                    continue
                par = [_fmt(e.get("top1_flatq")), _fmt(e.get("top1_ort")), _fmt(e.get("agreement")),
                       _fmt(e.get("max_abs_logit_diff"), 3), str(e.get("samples", "—"))] if "top1_ort" in e else ["—"] * 5
                lines.append(f"| {r.bits} | {e['format']} | {Path(e['path']).name} | {_size(e['bytes'])} | "
                             + " | ".join(par) + " |")
        if not lines:
            return ""
        return "\n".join([
            "| bits | format | file | size | top-1 flatq (%) | top-1 ONNX Runtime (%) | argmax agree (%) | "
            "max abs Δ logit | images |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
            *lines,
        ])

    def reconstruction_table(self) -> str:
        """Per bit-width and block: the block's output MSE with round-to-nearest and after reconstruction, the
        weights rounded the other way, and the seconds it took. Empty without reconstruction.

        Example:
            >>> row = PTQRow("w2a4", 2, 4, 60.0, 90.0, 10.0, 5.0, reconstruction=[{"name": "layer1.0",
            ...     "kind": "BasicBlock", "layers": ["a", "b"], "iters": 1000, "seconds": 12.5, "loss_rtn": 4.0,
            ...     "loss": 1.0, "flipped": 30, "weights": 100}])
            >>> print(PTQReport(70.0, 95.0, rows=[row]).reconstruction_table().splitlines()[2])
            | w2a4 | layer1.0 | BasicBlock | 2 | 4 | 1 | 0.25 | 30.0 | 12.5 |
        """
        lines = []
        for r in self.rows:
            for b in r.reconstruction:
                ratio = b["loss"] / b["loss_rtn"] if b["loss_rtn"] > 0 else float("nan")
                flip = 100.0 * b.get("flipped", 0) / b["weights"] if b.get("weights") else float("nan")
                lines.append(f"| {r.bits} | {b['name']} | {b['kind']} | {len(b['layers'])} | {b['loss_rtn']:.4g} | "
                             f"{b['loss']:.4g} | {ratio:.2f} | {flip:.1f} | {b['seconds']:.1f} |")
        if not lines:
            return ""
        return "\n".join([
            "| bits | block | kind | layers | output MSE, round-to-nearest | output MSE, reconstructed | ratio | "
            "weights rounded the other way (%) | seconds |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
            *lines,
        ])

    def policy_line(self) -> str:
        kept = ", ".join(self.kept_8bit) if self.kept_8bit else "none"
        sel = ""
        if self.include or self.exclude:
            sel = f"; include={self.include!r} exclude={self.exclude!r}"
        recipe = ""
        if self.recipe:
            recipe = f"Recipe {PTQRecipe.from_dict(self.recipe).describe()}. "
        return recipe + (
            f"Layer policy: keep_first_last_8bit={self.keep_first_last_8bit} (first/last layers kept at 8 bit: "
            f"{kept}); weights symmetric per output channel, activations asymmetric per tensor; "
            f"weight observer={self.observer}, activation observer={self.act_observer}; calibration on "
            f"{self.calib_batches} batch(es) (requested {self.calib_batches_requested}); BatchNorm statistics "
            + (f"re-estimated per bit-width on the quantized network ({self.bn_batches} batches) before folding"
               if self.bn_reestimate else "folded as they are (no re-estimation)")
            + f"{sel}."
        )

    def folded_line(self) -> str:
        pairs = ", ".join(f"{c}←{b}" for c, b in self.folded_bn_pairs) or "none"
        return f"Folded BatchNorm pairs ({len(self.folded_bn_pairs)}): {pairs}."

    def markdown(self) -> str:
        """The whole report as Markdown: accuracy table, per-layer SQNR (worst layers first), policy lines."""
        out = [
            "# Post-training quantization",
            "",
            f"FP: top-1 {self.fp_top1:.2f} %, top-{self.top5_k} {self.fp_top5:.2f} % "
            f"on {self.num_eval_samples} samples, {self.num_classes} classes (device {self.device}).",
            "",
            self.markdown_table(),
            "",
            self.folded_line(),
            "",
            self.policy_line(),
            "",
        ]
        if self.plan:
            p = self.plan
            hist: dict[int, int] = {}
            for n, b in p["bits"].items():
                hist[b] = hist.get(b, 0) + p["sizes"][n]
            out += [f"Mixed-precision plan of the `-mixed` rows: {p['bits_per_weight']:.3f} bits per weight on "
                    f"average (budget {p['budget']:g}; " + ", ".join(f"{w} weights at {b} bits"
                                                                  for b, w in sorted(hist.items()))
                    + f"), chosen on the {p['source']} per-layer cost.", ""]
        out += ["## Per-layer SQNR (dB), worst layers first"]
        for r in self.rows:
            out += ["", f"### {r.bits}", "", "| layer | W bits | A bits | weight SQNR | act SQNR |",
                    "|---|---:|---:|---:|---:|"]
            for layer in sorted(r.layers, key=lambda x: x.worst_db):
                out.append(
                    f"| {layer.name} | {_bits_label(layer.weight_bits)} | {_bits_label(layer.act_bits)} | "
                    f"{_fmt(layer.weight_sqnr_db)} | {_fmt(layer.act_sqnr_db)} |"
                )
        if any(r.reconstruction for r in self.rows):
            out += ["", "## Block reconstruction", "", self.reconstruction_table()]
        if any(r.exports for r in self.rows):
            out += ["", "## Exported files", "", self.export_table()]
        if self.timing:
            out += ["", "Timing (s): " + ", ".join(f"{k}={v:.2f}" for k, v in self.timing.items()) + "."]
        return "\n".join(out) + "\n"

    def to_markdown(self, path: PathLike | None = None) -> str:
        """:meth:`markdown`, written to ``path`` when given."""
        text = self.markdown()
        if path is not None:
            _write(path, text)
        return text

    def plot_accuracy(self, path: PathLike = "ptq_accuracy.png") -> Path:
        """Top-1/top-5 vs bit-width (requested order), FP as horizontal lines; a PNG via the Agg canvas.

        A directory ``path`` gets ``ptq_accuracy.png`` inside it. Written atomically (temporary file, then
        ``os.replace``). Returns the file written.
        """
        return report_plot.save_accuracy_plot(self, path)

    def figure(self) -> Any:
        """The accuracy-vs-bit-width plot as a matplotlib ``Figure`` (Agg canvas; for loggers and files)."""
        return report_plot.accuracy_figure(self)

    def write(
        self, save_dir: PathLike, names: Sequence[str] = REPORT_FORMATS, overwrite: bool = False
    ) -> dict[str, Path]:
        """Write the report as ``ptq_report.json``, ``.md``, ``.csv`` and ``.png`` (the plot) into ``save_dir``.

        The one writer behind the callback, ``flatq-train`` and ``flatq-ptq``. All files are first written to
        temporary files beside their targets, then moved into place with ``os.replace``: a reader never sees
        a half-written file, and a failure leaves no partial report. An earlier report in ``save_dir`` is never
        replaced unless ``overwrite=True``: the new one gets the first free numbered name
        (``ptq_report_2.*``, …, see :func:`report_paths`). Returns ``{format: path}``.
        """
        unknown = [n for n in names if n not in REPORT_FORMATS]
        if unknown or not names:
            raise ValueError(f"names must be a non-empty subset of {REPORT_FORMATS}, got {tuple(names)!r}")
        if not isinstance(overwrite, bool):
            raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
        d = Path(save_dir)
        d.mkdir(parents=True, exist_ok=True)
        out = report_paths(d, [n for n in REPORT_FORMATS if n in names], overwrite=overwrite)
        temps: dict[str, Path] = {}
        try:
            for fmt, target in out.items():
                tmp = temps[fmt] = _temp_beside(target)
                if fmt == "json":
                    tmp.write_text(self.to_json() + "\n")
                elif fmt == "md":
                    tmp.write_text(self.markdown())
                elif fmt == "csv":
                    tmp.write_text(self.to_csv())
                else:
                    self.figure().savefig(tmp, dpi=120, format="png")
            for fmt, target in out.items():
                os.replace(temps.pop(fmt), target)
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
        return out


def _size(n: int) -> str:
    """``1536`` → ``'1.5 KiB'``; bytes, KiB or MiB."""
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _csv_num(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _write(path: PathLike, text: str) -> None:
    """Write ``text`` atomically: a temporary file beside ``path``, then ``os.replace``."""
    write_file_atomic(path, text, overwrite=True)
