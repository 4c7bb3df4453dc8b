"""The quality benchmark's report side: the tables, summaries and plots built from its JSON files
(``benchmarks/quality.py`` is the entry point)."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.quality_train import VARIANTS
from flatq_lightning.callbacks.flatness import plot_landscape_1d


def summarize(results: list[dict[str, Any]], bits: tuple[str, ...]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    plain_t = statistics.mean(r["train_s"] for r in by.get("plain", [])) if "plain" in by else None

    def ms(vals: list[float]) -> str:
        if len(vals) == 1:
            return f"{vals[0]:.2f}"
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"

    head = "| training | seeds | train s | vs plain | FP | " + " | ".join(b.upper() for b in bits) + " | Hessian trace | top eig |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in [v for v in VARIANTS if v in by] + [v for v in by if v not in VARIANTS]:
        rs = by[v]
        t = statistics.mean(r["train_s"] for r in rs)
        ratio = f"{t / plain_t:.2f}x" if plain_t else "-"
        cells = [ms([r["ptq"].get(b, float("nan")) for r in rs]) for b in bits]
        lines.append(
            f"| {v} | {len(rs)} | {t:.0f} | {ratio} | {ms([r['fp_top1'] for r in rs])} | " + " | ".join(cells)
            + f" | {ms([r['flatness']['hessian_trace'] for r in rs])} | {ms([r['flatness']['top_eig'] for r in rs])} |"
        )
    return "\n".join(lines)


def plots(results: list[dict[str, Any]], bits: tuple[str, ...], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    # the methods run on several seeds (mean ± std as error bars); all of them when none has several
    multi = {v: rs for v, rs in by.items() if len(rs) > 1} or by
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(bits) + 1))
    colors = plt.get_cmap("tab20").colors
    for i, (v, rs) in enumerate(multi.items()):
        cols = [[r["fp_top1"] for r in rs]] + [[r["ptq"][b] for r in rs] for b in bits]
        ys = [statistics.mean(c) for c in cols]
        err = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[i % len(colors)], label=f"{v} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
    ax.set_xticks(xs, ["FP", *[b.upper() for b in bits]])
    ax.set_ylabel("top-1 (%)")
    ax.set_title("PTQ accuracy per training method (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_accuracy_vs_bits.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = list(by)
    for ax, key in zip(axes, ("hessian_trace", "top_eig")):
        ax.bar(range(len(names)), [statistics.mean(r["flatness"][key] for r in by[n]) for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(out / "quality_sharpness.png", dpi=120)
    plt.close(fig)

    slices = {v: (rs[0]["landscape"]["alphas"], rs[0]["landscape"]["losses"]) for v, rs in by.items() if v in ("plain", "sam", "dnq_wa", "dnq_wa_trap")}
    if slices:
        plot_landscape_1d(slices, out / "quality_landscape_1d.png", title="1-D loss slice (filter-normalised direction)")


def write_report(doc: dict[str, Any], bits: tuple[str, ...], out: Path) -> str:
    """``<out>/quality.md`` (the command, machine, the table of :func:`summarize` and any re-measured flatness) and
    the plots of ``doc["results"]``; returns the table."""
    table = summarize(doc["results"], bits)
    remeasured = ""
    if doc.get("flatness_remeasured"):
        remeasured = "\n\nFlatness measured again on the saved models (`--remeasure-flatness`):\n\n" + "\n".join(
            ["| training | seed | Hessian trace | top eig | batches | probes | date |", "|---|---|---|---|---|---|---|"]
            + [f"| {r['variant']} | {r['seed']} | {r['hessian_trace']:.1f} | {r['top_eig']:.1f} | {r['batches']} | "
               f"{r['probes']} | {r['date']} |" for r in sorted(doc["flatness_remeasured"], key=lambda r: (r["variant"], r["seed"]))]
        )
    (out / "quality.md").write_text(
        f"Command: `{doc['command']}`\n\nMachine: {doc['machine']}; date {time.strftime('%Y-%m-%d')}\n\n{table}{remeasured}\n"
    )
    plots(doc["results"], bits, out)
    return table


#: two-sided 95 % Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci95(vals: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t; 0 for one value)."""
    m = statistics.mean(vals)
    if len(vals) < 2:
        return m, float("nan")
    df = len(vals) - 1
    t = _T95.get(df) or _T95[max(k for k in _T95 if k <= df)]
    return m, t * statistics.stdev(vals) / math.sqrt(len(vals))


def summarize_runs(out: Path, baseline: str = "plain") -> tuple[str, dict[str, Any]]:
    """The generated summary of ``<out>/<variant>/seed<k>.json``: per variant and recipe, mean ± std, and the
    paired difference to ``baseline`` of the same seed as mean ± 95 % CI with the per-seed values."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted(out.glob("*/seed*.json")):
        r = json.loads(f.read_text())
        if "evaluation" in r:
            runs.setdefault(r["variant"], {})[r["seed"]] = r

    def cells(r: dict[str, Any]) -> dict[str, float]:
        ev = r["evaluation"]
        c = {"FP (as trained)": ev["fp"]["trained_bn"], "FP (clean BN)": ev["fp"]["clean_bn"]}
        for rec, bits in ev["ptq"].items():
            for b, v in bits.items():
                c[f"{b.upper()} {rec}"] = v
        return c

    columns: list[str] = []
    for rs in runs.values():
        for r in rs.values():
            for k in cells(r):
                if k not in columns:
                    columns.append(k)
    doc: dict[str, Any] = {"absolute": {}, "paired": {}}
    lines = ["## Top-1 (%), mean ± std over seeds", "", "| training | seeds | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for v, rs in runs.items():
        vals = {c: [cells(r)[c] for r in rs.values() if c in cells(r)] for c in columns}
        doc["absolute"][v] = {c: {"mean": statistics.mean(x), "std": statistics.stdev(x) if len(x) > 1 else None,
                                  "n": len(x)} for c, x in vals.items() if x}
        lines.append(f"| {v} | {','.join(map(str, sorted(rs)))} | " + " | ".join(
            (f"{statistics.mean(x):.2f} ± {statistics.stdev(x):.2f}" if len(x) > 1 else f"{x[0]:.2f}") if x else "—"
            for x in vals.values()) + " |")
    base = runs.get(baseline, {})
    lines += ["", f"## Paired difference to `{baseline}` (same seed, data and budget): mean ± 95 % CI [per-seed values]", "",
              "| training | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for v, rs in runs.items():
        if v == baseline:
            continue
        row, drow = [], {}
        for c in columns:
            seeds = sorted(s for s in rs if s in base and c in cells(rs[s]) and c in cells(base[s]))
            d = [cells(rs[s])[c] - cells(base[s])[c] for s in seeds]
            if not d:
                row.append("—")
                continue
            m, h = mean_ci95(d)
            drow[c] = {"mean": m, "ci95": h, "per_seed": dict(zip(seeds, d))}
            row.append(f"{m:+.2f} ± {h:.2f} [{', '.join(f'{x:+.1f}' for x in d)}]" if len(d) > 1 else f"{m:+.2f} [1 seed]")
        doc["paired"][v] = drow
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    lines += _seconds_table(runs, doc)
    return "\n".join(lines) + "\n", doc


def _seconds_table(runs: dict[str, dict[int, dict[str, Any]]], doc: dict[str, Any]) -> list[str]:
    """Seconds per model of each recipe (all its bit-widths: BN re-estimation, calibration, reconstruction and the
    test-set evaluations) and, for reconstruction, the seconds of reconstruction alone per bit-width."""
    secs: dict[str, list[float]] = {}
    recon: dict[str, list[float]] = {}
    for rs in runs.values():
        for r in rs.values():
            ev = r["evaluation"]
            for rec in ev["ptq"]:
                if rec in ev.get("seconds", {}):
                    secs.setdefault(rec, []).append(ev["seconds"][rec])
            for rec, per_bits in ev.get("reconstruction", {}).items():
                for b, blocks in per_bits.items():
                    recon.setdefault(f"{rec} {b.upper()}", []).append(sum(x["seconds"] for x in blocks))
    doc["seconds"] = {k: statistics.median(v) for k, v in secs.items()}
    doc["reconstruction_seconds"] = {k: statistics.median(v) for k, v in recon.items()}
    out = ["", "## Seconds per model (median over the runs; one intra-op thread, see the command for the load)", "",
           "| recipe | runs | seconds (all its bit-widths, with the test-set evaluations) |", "|---|---:|---:|"]
    out += [f"| {k} | {len(v)} | {statistics.median(v):.0f} |" for k, v in secs.items()]
    if recon:
        out += ["", "| reconstruction alone | runs | seconds |", "|---|---:|---:|"]
        out += [f"| {k} | {len(v)} | {statistics.median(v):.0f} |" for k, v in recon.items()]
    return out


def plot_paired(doc: dict[str, Any], path: Path) -> None:
    """Paired differences to plain with 95 % CI bars, one group per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(doc["paired"])
    if not variants:
        return
    cols = [c for c in next(iter(doc["paired"].values()))]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(cols)), 4.2))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(cols))]
        ms = [doc["paired"][v].get(c, {}).get("mean", float("nan")) for c in cols]
        hs = [doc["paired"][v].get(c, {}).get("ci95", 0.0) for c in cols]
        ax.bar(xs, ms, width, yerr=hs, capsize=3, label=v)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("top-1 minus plain, same seed (points)")
    ax.set_title("Paired difference to plain training (mean ± 95 % CI over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: Path) -> str:
    text, doc = summarize_runs(out)
    header = (f"# Quality benchmark summary: `{out}`\n\nGenerated by `python benchmarks/quality.py --summarize "
              f"--out {out}` on {time.strftime('%Y-%m-%d %H:%M')} from the per-run files `<variant>/seed<k>.json` "
              "beside it (each holds its training record, commit, command and machine).\n\n")
    for name, body in (("summary.md", header + text), ("summary.json", json.dumps(doc, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(body)
        tmp.replace(out / name)
    plot_paired(doc, out / "paired_difference.png")
    return text
