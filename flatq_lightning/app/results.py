"""What a ``flatq-train`` job or sweep reports: the comparison table, the CSV rows, the mean ± std over seeds,
and the sweep summary."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["comparison_table", "seed_aggregate", "summarize_sweep"]


def _fmt(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if f != f else f"{f:.2f}"


def comparison_table(results: dict[str, Any]) -> str:
    """Markdown: one row per bit-width (FP first), one column per variant (top-1 %), then fit times.

    Example:
        >>> r = {"bits": ["w4a4"], "variants": {"plain": {"fp_top1": 97.0, "ptq": {"w4a4": {"top1": 60.0}},
        ...      "fit_seconds": 9.5}, "dnq": {"fp_top1": 96.5, "ptq": {"w4a4": {"top1": 90.0}}, "fit_seconds": 12.0}}}
        >>> print(comparison_table(r))
        | bits | plain | dnq |
        |---|---:|---:|
        | FP | 97.00 | 96.50 |
        | W4A4 | 60.00 | 90.00 |
        | fit time (s) | 9.5 | 12.0 |
    """
    names = list(results["variants"])
    vs = [results["variants"][n] for n in names]
    lines = ["| bits | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines.append("| FP | " + " | ".join(_fmt(v.get("fp_top1")) for v in vs) + " |")
    for b in results.get("bits", []):
        lines.append(
            f"| {b.upper()} | " + " | ".join(_fmt(v.get("ptq", {}).get(b, {}).get("top1")) for v in vs) + " |"
        )
    lines.append("| fit time (s) | " + " | ".join(f"{v.get('fit_seconds', 0):.1f}" for v in vs) + " |")
    return "\n".join(lines)


def _summary_rows(all_results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    bits: list[str] = []
    for r in all_results:
        bits += [b for b in r.get("bits", []) if b not in bits]
    # only the overrides that tell the jobs apart (the swept ones), unless there is a single job
    common = (
        set.intersection(*(set(r.get("overrides", [])) for r in all_results))
        if len(all_results) > 1
        else set()
    )
    header = ["job", "overrides", "variant", "fp_top1", *[f"{b}_top1" for b in bits], "fit_seconds"]
    rows = []
    for r in all_results:
        for name, v in r.get("variants", {}).items():
            rows.append(
                [
                    str(r.get("job", "")),
                    " ".join(o for o in r.get("overrides", []) if o not in common),
                    name,
                    _fmt(v.get("fp_top1")),
                    *[_fmt(v.get("ptq", {}).get(b, {}).get("top1")) for b in bits],
                    f"{v.get('fit_seconds', 0):.1f}",
                ]
            )
    return header, rows


def _results_csv(all_results: Sequence[dict[str, Any]]) -> str:
    header, rows = _summary_rows(all_results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _is_seed(override: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == "seed"


def seed_aggregate(all_results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """Mean ± sample std and n over seeds, per (other swept overrides, variant); None unless seeds were swept.

    Columns: overrides, variant, n, seeds, then ``mean ± std`` of FP top-1, each bit-width's top-1 and fit time.

    Example:
        >>> r = lambda seed, acc: {"overrides": [f"seed={seed}", "quant=w4a4"], "bits": ["w4a4"],
        ...     "variants": {"dnq": {"fp_top1": 90.0, "ptq": {"w4a4": {"top1": acc}}, "fit_seconds": 2.0}}}
        >>> header, rows = seed_aggregate([r(0, 80.0), r(1, 84.0)])
        >>> rows[0][:5]
        ['', 'dnq', '2', '0,1', '90.00 ± 0.00']
        >>> rows[0][5]
        '82.00 ± 2.83'
    """
    import statistics

    seeds = {o for r in all_results for o in r.get("overrides", []) if _is_seed(o)}
    if len(seeds) < 2:
        return None
    bits: list[str] = []
    for r in all_results:
        bits += [b for b in r.get("bits", []) if b not in bits]
    others = [[o for o in r.get("overrides", []) if not _is_seed(o)] for r in all_results]
    common = set.intersection(*(set(o) for o in others)) if len(others) > 1 else set()
    groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for r, over in zip(all_results, others):
        seed = next((o.split("=", 1)[1] for o in r.get("overrides", []) if _is_seed(o)), str(r.get("seed", "")))
        key_over = " ".join(o for o in over if o not in common)
        for name, v in r.get("variants", {}).items():
            groups.setdefault((key_over, name), []).append((seed, v))

    def stat(vals: list[float]) -> str:
        vals = [x for x in vals if x == x]  # NaN: a failed or skipped measurement
        if not vals:
            return "—"
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        return f"{statistics.fmean(vals):.2f} ± {_fmt(sd)}"

    def num(x: Any) -> float:
        try:
            return float(x)
        except (TypeError, ValueError):
            return float("nan")

    header = ["overrides", "variant", "n", "seeds", "fp_top1", *[f"{b}_top1" for b in bits], "fit_seconds"]
    rows = []
    for (over, name), items in groups.items():
        vs = [v for _, v in items]
        rows.append(
            [over, name, str(len(items)), ",".join(sd for sd, _ in items), stat([num(v.get("fp_top1")) for v in vs])]
            + [stat([num(v.get("ptq", {}).get(b, {}).get("top1")) for v in vs]) for b in bits]
            + [stat([num(v.get("fit_seconds")) for v in vs])]
        )
    return header, rows


def summarize_sweep(sweep_dir: str | os.PathLike[str]) -> tuple[Path, Path] | None:
    """Collect ``*/results.json`` below ``sweep_dir`` into ``summary.md`` and ``summary.csv`` there.

    When the sweep ran over ``seed``, ``summary.md`` also has a table of mean ± std (sample) and n over the
    seeds for each setting and variant, also written as ``summary_seeds.csv``. Returns the two paths, or None
    when no job wrote results.
    """
    sweep = Path(sweep_dir)
    found = sorted(sweep.glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name))  # 2 < 10
    all_results = []
    for f in found:
        r = json.loads(f.read_text())
        r["job"] = f.parent.name.split("_", 1)[0]
        all_results.append(r)
    if not all_results:
        return None
    header, rows = _summary_rows(all_results)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    title = all_results[0].get("experiment", "sweep")
    md_path, csv_path = sweep / "summary.md", sweep / "summary.csv"
    agg = seed_aggregate(all_results)
    if agg is not None:
        h, rs = agg
        md += ["", "## Mean ± std over seeds (sample std; n seeds)", "",
               "| " + " | ".join(h) + " |", "|" + "---|" * 2 + "---:|" * (len(h) - 2)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rs]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(h)
        w.writerows(rs)
        (sweep / "summary_seeds.csv").write_text(buf.getvalue())
    else:
        (sweep / "summary_seeds.csv").unlink(missing_ok=True)  # from an earlier summary of this directory
    md_path.write_text(f"# {title}: multirun summary (top-1 %, test split)\n\n" + "\n".join(md) + "\n")
    csv_path.write_text(_results_csv(all_results))
    return md_path, csv_path
