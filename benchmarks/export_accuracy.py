"""Export accuracy, seed by seed (issue #21): flatq's W8A8 ONNX files against ONNX Runtime's own ``quantize_static``
on the same trained networks and the same calibration images.

For every saved CIFAR ResNet-20 ``<models>/seed<k>.pt`` (``benchmarks/quality.py --train-only`` writes them):
the FP network exported to ONNX, then these W8A8 files, each scored by ONNX Runtime (default optimisation, its
integer kernels) on the full test set:

- ``ort_static``: ``quantize_static`` on the FP file after ``quant_pre_process`` (QDQ, per-channel int8 weights,
  uint8 activations, min-max calibration), the anchor;
- ``flatq_minmax_layer_inputs``: flatq min-max PTQ, quantizers at the layer inputs (the placement before #21);
- ``flatq_minmax_onnxruntime``: the same with the ``"onnxruntime"`` placement;
- ``flatq_practical_onnxruntime``: the ``practical`` recipe (MSE weight clipping, percentile activation ranges,
  BN re-estimated on the quantized network) with the ``"onnxruntime"`` placement.

Every file uses the same 1,024 calibration images (8 batches of 128 from the 10,000-image training subset of
docs/results.md §2). Writes ``<out-dir>/seed<k>.json`` per model and a generated ``summary.md``/``summary.json``:
top-1 per seed and the paired difference to ``ort_static`` (mean ± 95 % CI over seeds).

    python benchmarks/export_accuracy.py --data ../shared/data/cifar10-jpeg.zip \\
        --models benchmarks/results/quality/cpu/plain --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from export import _write_atomic, load_state, machine, ort_static  # noqa: E402

from benchmarks._common import add_seed_model_args, ci95, cifar_seed_models  # noqa: E402
from flatq_lightning.ptq.onnx_export import check_onnx_parity, export_onnx  # noqa: E402
from flatq_lightning.ptq.recipe import PTQRecipe  # noqa: E402
from flatq_lightning.ptq.runner import run_ptq  # noqa: E402
from flatq_lightning.quant import batch_inputs  # noqa: E402

FILES = ("ort_static", "flatq_minmax_layer_inputs", "flatq_minmax_onnxruntime", "flatq_practical_onnxruntime")
CALIB_IMAGES = 1024
BN_BATCHES = 16
def evaluate_seed(path: Path, dm: Any, args: argparse.Namespace, files_dir: Path) -> dict[str, Any]:
    from flatq_lightning.app.models import create_model

    net = load_state(create_model("cifar_resnet20", num_classes=10), path)
    test = list(dm.test_dataloader())
    calib = [batch_inputs(b) for _, b in zip(range(CALIB_IMAGES // 128), dm.calib_dataloader(128))]

    def bn_loader() -> Any:  # the same seeded draw of training batches for every file that re-estimates BN
        g = torch.Generator().manual_seed(1)
        return torch.utils.data.DataLoader(dm.train_dataset, batch_size=128, shuffle=True, generator=g)

    d = files_dir / path.stem
    d.mkdir(parents=True, exist_ok=True)
    x = calib[0][:1]
    fp = export_onnx(net, d / "fp.onnx", x, overwrite=True)
    rows: dict[str, Any] = {"fp": {"top1_ort": check_onnx_parity(net, fp, test).top1_ort}}
    for key in FILES:
        t = time.perf_counter()
        out = d / f"{key}.onnx"
        if key == "ort_static":
            out.unlink(missing_ok=True)
            ort_static(fp, out, calib)
            p = check_onnx_parity(net, out, test)
            rows[key] = {"top1_ort": p.top1_ort, "agreement_with_source": p.agreement, "top1_flatq": None}
        else:  # the library's own PTQ and export, as a user runs them: run_ptq writes the file and scores it
            _, recipe, placement = key.split("_", 2)
            report = run_ptq(net, calib, test, bits=("w8a8",), calib_batches=len(calib), progress=False,
                             recipe=PTQRecipe.preset(recipe, bn_batches=BN_BATCHES, placement=placement),
                             bn_loader=bn_loader(), bn_transform=dm.augment_batch, evaluate_fp=False,
                             export_dir=d / key, export_formats=("onnx",), overwrite=True)
            e = report.row("w8a8").exports[0]
            rows[key] = {"top1_ort": e["top1_ort"], "agreement_with_source": e["agreement"],
                         "top1_flatq": e["top1_flatq"]}
        rows[key]["seconds"] = time.perf_counter() - t
        print(f"[{path.stem}] {key}: top-1 ORT {rows[key]['top1_ort']:.2f}", flush=True)
    return {"model": str(path), "rows": rows}


def summarize(out_dir: Path) -> dict[str, Any]:
    recs = {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("seed*.json"))}
    seeds = sorted(recs)
    summary: dict[str, Any] = {"seeds": seeds, "top1": {}, "paired_vs_ort_static": {}}
    for key in ("fp", *FILES):
        vals = [recs[s]["result"]["rows"][key]["top1_ort"] for s in seeds]
        summary["top1"][key] = dict(zip(seeds, vals))
        if key != "ort_static":
            diffs = [v - recs[s]["result"]["rows"]["ort_static"]["top1_ort"] for s, v in zip(seeds, vals)]
            m, h = ci95(diffs)
            summary["paired_vs_ort_static"][key] = {"mean": m, "ci95": h, "per_seed": diffs}
    md = ["# W8A8 ONNX files scored by ONNX Runtime: flatq vs quantize_static (generated by "
          "`benchmarks/export_accuracy.py`)", "",
          "| file | " + " | ".join(seeds) + " | mean | paired difference to quantize_static (mean ± 95 % CI) |",
          "|---|" + "---:|" * (len(seeds) + 2)]
    for key, per in summary["top1"].items():
        vals = list(per.values())
        pd = summary["paired_vs_ort_static"].get(key)
        diff = f"{pd['mean']:+.2f} ± {pd['ci95']:.2f}" if pd else "–"
        md.append(f"| {key} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {statistics.fmean(vals):.2f} | {diff} |")
    md += ["", *[f"- `{s}.json`: {recs[s]['date']}, commit {recs[s]['commit']}, `{recs[s]['command']}`" for s in seeds]]
    _write_atomic(out_dir / "summary.md", "\n".join(md) + "\n")
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_model_args(ap)
    ap.add_argument("--files", default="bench_out/export_accuracy")
    ap.add_argument("--out-dir", default="benchmarks/results/export_accuracy/cpu")
    ap.add_argument("--summarize", action="store_true", help="only regenerate the summary")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    if not args.summarize:
        if args.threads:
            torch.set_num_threads(args.threads)
        from flatq_lightning.app.data import CIFAR10DataModule

        dm = CIFAR10DataModule(args.data, batch_size=128, eval_batch_size=128, train_subset=10_000, seed=0,
                               num_workers=0)
        dm.setup("fit")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        for s, path in cifar_seed_models(args.models, args.seeds):
            torch.manual_seed(0)
            res = evaluate_seed(path, dm, args, Path(args.files))
            rec = {"benchmark": "export_accuracy", "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
                   "command": "python " + " ".join(sys.argv), "machine": machine(), "result": res}
            _write_atomic(out_dir / f"seed{s}.json", json.dumps(rec, indent=1) + "\n")
    s = summarize(out_dir)
    print((out_dir / "summary.md").read_text())
    return 0 if s["seeds"] else 1


if __name__ == "__main__":
    sys.exit(main())
