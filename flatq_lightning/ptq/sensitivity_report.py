"""The per-layer sensitivity report (:func:`~flatq_lightning.ptq.sensitivity.analyze_sensitivity`): rows,
Spearman rank correlations, the table, the bar chart, the files and the logger metrics."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import write_file_atomic

__all__ = ["SIDES", "LayerSensitivity", "SensitivityReport", "spearman"]

#: the two sides of a layer a quantizer acts on
SIDES = ("weight", "act")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant or too short.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 45]), spearman([1, 2, 3], [3, 2, 1])
        (1.0, -1.0)
    """
    if len(a) != len(b):
        raise ValueError(f"spearman: the sequences differ in length ({len(a)} vs {len(b)})")
    if len(a) < 3:
        return math.nan

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


@dataclass
class LayerSensitivity:
    """One layer, side and width: the predicted loss increase and what measurement found."""

    layer: str
    side: str
    bits: int
    #: the weight count of the layer (its size in a mixed-precision plan)
    numel: int
    #: predicted loss change (the report's ``order``: first and second order, or the second alone)
    predicted: float
    #: the theory's term alone, ½·eᵀHe
    second_order: float = 0.0
    #: only this layer's side quantized: FP top-1 minus its top-1, its loss minus FP loss
    top1_drop: float | None = None
    loss_drop: float | None = None
    #: every layer's side quantized but this one's: its top-1 minus the all-quantized top-1 (and the loss saved)
    top1_gain: float | None = None
    loss_gain: float | None = None


@dataclass
class SensitivityReport:
    """Per-layer rows, the reference accuracies, Spearman correlations and the two analyses' times."""

    rows: list[LayerSensitivity]
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    #: ``{"weight3": {"predicted_vs_top1_drop": r, "second_order_vs_top1_drop": r, ...}, ...}``
    spearman: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    images: int = 0
    recipe: str = "practical"
    #: the prediction's order (12: first and second, 2: second alone)
    order: int = 12

    def costs(self, side: str = "weight", source: str = "predicted") -> dict[str, dict[int, float]]:
        """``{layer: {bits: cost}}`` for a plan: ``"predicted"``, ``"second_order"``, ``"top1_drop"`` or
        ``"loss_drop"``."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        out: dict[str, dict[int, float]] = {}
        for r in self.rows:
            v = getattr(r, source, None)
            if r.side == side and v is not None:
                out.setdefault(r.layer, {})[r.bits] = float(v)
        return out

    def sizes(self) -> dict[str, int]:
        return {r.layer: r.numel for r in self.rows if r.side == "weight"}

    def table(self, side: str | None = None, bits: int | None = None) -> str:
        """A markdown table, one row per layer, side and width (measured columns empty when not measured)."""

        def f(v: float | None, p: str = ".2f") -> str:
            return "" if v is None else format(v, p)

        lines = ["| layer | side | bits | weights | predicted ΔL | ½eᵀHe | top-1 drop (only it) | loss drop | "
                 "top-1 gain (all but it) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            if (side is None or r.side == side) and (bits is None or r.bits == bits):
                lines.append(f"| {r.layer} | {r.side} | {r.bits} | {r.numel} | {r.predicted:.3g} | {r.second_order:.3g} | "
                             f"{f(r.top1_drop)} | {f(r.loss_drop, '.4f')} | {f(r.top1_gain)} |")
        for key, rs in self.spearman.items():
            lines.append("")
            lines.append(f"Spearman, predicted vs measured, {key}: " + ", ".join(
                f"{k} {v:+.2f}" for k, v in rs.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "reference": self.reference, "spearman": self.spearman,
                "seconds": self.seconds, "images": self.images, "recipe": self.recipe}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityReport:
        return cls(rows=[LayerSensitivity(**r) for r in d["rows"]], reference=dict(d.get("reference", {})),
                   spearman=dict(d.get("spearman", {})), seconds=dict(d.get("seconds", {})),
                   images=int(d.get("images", 0)), recipe=str(d.get("recipe", "practical")),
                   order=int(d.get("order", 12)))

    def save(self, directory: str | Path, overwrite: bool = False, plot: bool = True) -> list[Path]:
        """Write ``sensitivity.json``, ``sensitivity.md`` and (``plot``) ``sensitivity.png`` into ``directory``,
        each atomically; an existing file is an error unless ``overwrite``."""
        import json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = [d / "sensitivity.json", d / "sensitivity.md"] + ([d / "sensitivity.png"] if plot else [])
        clash = [str(p) for p in paths if p.exists()]
        if clash and not overwrite:
            raise FileExistsError(f"refusing to replace {clash}: pass overwrite=True or choose another directory")
        write_file_atomic(paths[0], json.dumps(self.to_dict(), indent=1) + "\n", overwrite=overwrite)
        write_file_atomic(paths[1], "# Per-layer sensitivity\n\n" + self.table() + "\n", overwrite=overwrite)
        if plot:
            self.plot(paths[2], overwrite=overwrite)
        return paths

    def plot(self, path: str | Path, overwrite: bool = False) -> Path:
        """Bar chart per side and width: predicted ΔL and measured top-1 drop (only this layer), each scaled to
        its own maximum so that the two rankings can be compared by eye."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted({(r.side, r.bits) for r in self.rows})
        fig, axes = plt.subplots(len(keys), 1, figsize=(max(6, 0.35 * len(self.sizes()) + 2), 2.6 * len(keys)),
                                 squeeze=False)
        for ax, (side, bits) in zip(axes[:, 0], keys):
            rs = [r for r in self.rows if r.side == side and r.bits == bits]
            xs = range(len(rs))
            pred = [max(r.predicted, 0.0) for r in rs]
            meas = [max(r.top1_drop or 0.0, 0.0) for r in rs]
            pm, mm = max(pred) or 1.0, max(meas) or 1.0
            ax.bar([x - 0.2 for x in xs], [p / pm for p in pred], 0.4, label=f"predicted ΔL (max {pm:.3g})")
            if any(r.top1_drop is not None for r in rs):
                ax.bar([x + 0.2 for x in xs], [m / mm for m in meas], 0.4,
                       label=f"measured top-1 drop (max {mm:.2f} pts)")
            rho = self.spearman.get(f"{side}{bits}", {}).get("predicted_vs_top1_drop")
            ax.set_title(f"{side} at {bits} bits" + (f", Spearman {rho:+.2f}" if rho is not None else ""))
            ax.set_xticks(list(xs), [r.layer for r in rs], rotation=70, fontsize=7)
            ax.legend(fontsize=7)
        fig.tight_layout()
        out = write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), overwrite=overwrite)
        plt.close(fig)
        return out

    def log_to(self, loggers: Iterable[Any], prefix: str = "sensitivity") -> None:
        """The Spearman correlations and the per-layer predicted/measured values as metrics of ``loggers``."""
        metrics: dict[str, float] = {}
        for key, rs in self.spearman.items():
            for k, v in rs.items():
                if not math.isnan(v):
                    metrics[f"{prefix}/spearman_{key}_{k}"] = v
        for r in self.rows:
            base = f"{prefix}/{r.side}{r.bits}/{r.layer}"
            metrics[f"{base}/predicted"] = r.predicted
            if r.top1_drop is not None:
                metrics[f"{base}/top1_drop"] = r.top1_drop
        for lg in loggers:
            lg.log_metrics(metrics)
