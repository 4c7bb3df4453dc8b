"""Per-layer sensitivity and mixed-precision plans (issue #24), seed by seed on the saved CIFAR ResNet-20s.

For every saved ``<models>/seed<k>.pt`` (plain training, docs/results.md §2; ``benchmarks/quality.py
--train-only`` writes them), with the ``practical`` PTQ recipe (MSE weight clipping, percentile activation
ranges, BN re-estimated on the quantized network):

1. **Sensitivity**: predicted per-layer loss change (:func:`~flatq_lightning.ptq.sensitivity.predict_sensitivity`
   on ``--predict-images`` held-out *training* images: the 40,000 the 10,000-image training subset left out) and
   measured per-layer top-1/loss change on ``--eval-images`` test images (a seeded random subset), weights at ``--weight-bits``
   and activations at ``--act-bits``; Spearman rank correlations predicted vs measured; both analyses' times.
2. **Plans**: the exact knapsack (:func:`~flatq_lightning.ptq.mixed_precision.plan_bits`) over the predicted
   weight costs at widths ``--choices``, at the weight size of uniform W3 and of uniform W2 (first and last layer
   at 8 bits, as PTQ's uniform rows keep them); each plan and the uniform W3A4/W2A4 rows are then made by
   ``run_ptq`` (the same recipe, calibration and BN batches) and scored on the full test set.

Writes ``<out-dir>/seed<k>.json`` per model and a generated ``summary.md``/``summary.json`` (Spearman per seed,
plan minus uniform per seed and mean ± 95 % CI, the time ratio).

    python benchmarks/sensitivity.py --data ../shared/data/cifar10-jpeg.zip \\
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import add_seed_model_args, ci95, cifar_seed_models  # noqa: E402
from flatq_lightning.ptq.mixed_precision import parse_bits_choices, plan_bits  # noqa: E402
from flatq_lightning.ptq.recipe import PTQRecipe  # noqa: E402
from flatq_lightning.ptq.runner import run_ptq  # noqa: E402
from flatq_lightning.ptq.sensitivity import analyze_sensitivity, take_images  # noqa: E402
from flatq_lightning.quant import QuantTarget  # noqa: E402
from flatq_lightning.utils.io import write_file_atomic  # noqa: E402

BN_BATCHES = 16


def heldout_train_batches(dm: Any, images: int, batch: int = 128, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``images`` training images the data module's training subset left out (the same seeded draw as its
    ``setup``: data seed 0, no validation split), normalised like the test split, in batches."""
    from flatq_lightning.app.data import ArrayImageDataset
    from flatq_lightning.app.data.cifar import _subset, load_cifar_arrays

    a = load_cifar_arrays(dm.path, dm.dataset, dm.cache_dir, dm.path_key)
    n = len(a["y_train"])
    rng = np.random.default_rng(dm.seed)
    perm = rng.permutation(n)
    rest = perm[dm.val_size:]
    trained = set(np.sort(rest[_subset(len(rest), dm.train_subset, rng, "train_subset")]).tolist())
    left = np.array([i for i in range(n) if i not in trained])
    pick = np.sort(np.random.default_rng(seed).permutation(left)[:images])
    ds = ArrayImageDataset(np.ascontiguousarray(a["x_train"][pick]), a["y_train"][pick], dm.mean, dm.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)
    return [(x, y) for x, y in loader]


def uniform_budget(sizes: dict[str, int], bits: int) -> float:
    """Bits per weight of uniform ``bits`` with the first and last layer at 8 (PTQ's uniform rows)."""
    names = list(sizes)
    total = sum(sizes[n] * (8 if n in (names[0], names[-1]) else bits) for n in names)
    return total / sum(sizes.values())


def evaluate_seed(path: Path, dm: Any, args: argparse.Namespace) -> dict[str, Any]:
    from flatq_lightning.app.models import create_model

    net = create_model("cifar_resnet20", num_classes=10)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # a file is untrusted input
    net.eval()
    recipe = PTQRecipe.preset("practical", bn_batches=BN_BATCHES)
    calib = [b for _, b in zip(range(max(1, args.calib_images // 128)), dm.calib_dataloader(128))]
    test = list(dm.test_dataloader())
    eval_part = take_images(dm.test_dataloader(), args.eval_images)  # a seeded random subset (the split is by class)
    predict = heldout_train_batches(dm, args.predict_images)

    def bn_loader() -> Any:  # the same seeded draw of augmented training batches for every copy
        g = torch.Generator().manual_seed(1)
        loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=128, shuffle=True, generator=g)
        return [(dm.augment_batch(x), y) for _, (x, y) in zip(range(BN_BATCHES), loader)]

    choices = parse_bits_choices(args.choices)
    rep = analyze_sensitivity(
        net, calib, predict, eval_part, weight_bits=parse_bits_choices(args.weight_bits),
        act_bits=parse_bits_choices(args.act_bits), recipe=recipe, predict_bits=choices,
        hessian_batches=args.hessian_batches, probes=args.probes, bn_batches=[x for x, _ in bn_loader()],
        progress=True, all_but_bits=parse_bits_choices(args.all_but_bits),
    )
    print(f"[{path.stem}] sensitivity: predict {rep.seconds['predict']:.1f} s, measure {rep.seconds['measure']:.1f} s; "
          + "; ".join(f"{k}: " + ", ".join(f"{m} {v:+.2f}" for m, v in r.items() if m.endswith("top1_drop"))
                      for k, r in rep.spearman.items()), flush=True)
    sizes = rep.sizes()
    names = list(sizes)
    fixed = {names[0]: 8, names[-1]: 8}  # as PTQ's uniform rows keep them
    measured = rep.costs("weight", "loss_drop")
    for n in measured:
        measured[n].setdefault(8, 0.0)  # not measured: an 8-bit layer costs nothing next to these
    plans = {}
    for wb in (3, 2):
        budget = uniform_budget(sizes, wb)
        plans[f"w{wb}"] = plan_bits(rep.costs("weight", "predicted"), sizes, budget, choices, fixed=fixed)
        if set(choices) <= set(next(iter(measured.values()))):
            plans[f"w{wb}_measured"] = plan_bits(measured, sizes, budget, choices, source="loss_drop", fixed=fixed)
    t = time.perf_counter()
    rows: dict[str, Any] = {}
    for wb in (3, 2):
        todo = [(f"uniform_w{wb}a4", QuantTarget())]
        todo += [(f"plan{k[2:]}_w{wb}a4", QuantTarget(layer_bits={n: (b, None) for n, b in p.bits.items()}))
                 for k, p in plans.items() if k.startswith(f"w{wb}")]
        for key, target in todo:
            report = run_ptq(net, calib, test, bits=(f"w{wb}a4",), calib_batches=len(calib), progress=False,
                             recipe=recipe, target=target, bn_loader=bn_loader(), bn_transform=None,
                             evaluate_fp=False)
            r = report.rows[0]
            rows[key] = {"top1": r.top1, "row": r.bits}
            print(f"[{path.stem}] {key}: top-1 {r.top1:.2f}", flush=True)
    return {"model": str(path), "sensitivity": rep.to_dict(), "plans": {k: p.to_dict() for k, p in plans.items()},
            "ptq": rows, "ptq_seconds": time.perf_counter() - t}


def reliability_seed(path: Path, dm: Any, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """The measurement's own reproducibility: the "only this layer" drops measured again on 4,000 other test images
    (disjoint from the analysis's ``--eval-images``, the same seeded permutation), ranked against the stored
    measurement and against the prediction. No predictor can agree with a measurement better than the measurement
    agrees with itself."""
    from flatq_lightning.app.models import create_model
    from flatq_lightning.ptq.sensitivity import measure_sensitivity, spearman

    net = create_model("cifar_resnet20", num_classes=10)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.eval()
    ds = dm.test_dataloader().dataset
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    other = perm[args.eval_images: args.eval_images + args.remeasure_images].sort().values.tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, other), batch_size=250)
    calib = [b for _, b in zip(range(max(1, args.calib_images // 128)), dm.calib_dataloader(128))]
    rec = json.loads((out_dir / f"{path.stem}.json").read_text())["result"]["sensitivity"]
    wb, ab = parse_bits_choices(args.weight_bits), parse_bits_choices(args.act_bits)
    meas, _ = measure_sensitivity(net, calib, list(loader), wb, ab, recipe=PTQRecipe.preset("practical", bn_batches=BN_BATCHES),
                                  all_but=False)
    out: dict[str, Any] = {}
    for side, bits in (("weight", wb), ("act", ab)):
        for b in bits:
            rs = [r for r in rec["rows"] if r["side"] == side and r["bits"] == b and r["top1_drop"] is not None]
            again = [meas[(r["layer"], side, b)] for r in rs]
            out[f"{side}{b}"] = {
                "measured_vs_remeasured_top1_drop": spearman([r["top1_drop"] for r in rs], [m["top1_drop"] for m in again]),
                "measured_vs_remeasured_loss_drop": spearman([r["loss_drop"] for r in rs], [m["loss_drop"] for m in again]),
                "predicted_vs_remeasured_top1_drop": spearman([r["predicted"] for r in rs], [m["top1_drop"] for m in again]),
            }
    return out


def summarize(out_dir: Path) -> dict[str, Any]:
    recs = {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("seed*.json"))}
    seeds = sorted(recs)
    s: dict[str, Any] = {"seeds": seeds, "spearman": {}, "paired": {}, "seconds": {}}
    for seed in seeds:
        sp = recs[seed]["result"]["sensitivity"]["spearman"]
        for key, r in sp.items():
            for m, v in r.items():
                s["spearman"].setdefault(f"{key} {m}", []).append(v)
    for wb in (3, 2):
        first = recs[seeds[0]]["result"]
        for key in [k for k in first["ptq"] if k.startswith("plan") and k.endswith(f"_w{wb}a4")]:
            plan_key = f"w{wb}" + key[len("plan"):-len(f"_w{wb}a4")]
            uni = [recs[k]["result"]["ptq"][f"uniform_w{wb}a4"]["top1"] for k in seeds]
            pl = [recs[k]["result"]["ptq"][key]["top1"] for k in seeds]
            m, h = ci95([p - u for p, u in zip(pl, uni)])
            s["paired"][key] = {"mean": m, "ci95": h, "per_seed": [p - u for p, u in zip(pl, uni)], "uniform": uni,
                                "plan": pl,
                                "plan_bits_per_weight": [recs[k]["result"]["plans"][plan_key]["bits_per_weight"]
                                                         for k in seeds],
                                "budget": [recs[k]["result"]["plans"][plan_key]["budget"] for k in seeds]}
    pr = [recs[k]["result"]["sensitivity"]["seconds"]["predict"] for k in seeds]
    me = [recs[k]["result"]["sensitivity"]["seconds"]["measure"] for k in seeds]
    s["seconds"] = {"predict": pr, "measure": me, "ratio": [p / q for p, q in zip(pr, me)]}
    md = ["# Per-layer sensitivity and mixed-precision plans, CIFAR ResNet-20 (generated by "
          "`benchmarks/sensitivity.py`)", "", "## Spearman rank correlation, predicted vs measured, per seed", "",
          "| setting, predictor vs measure | " + " | ".join(seeds) + " | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
    for key, vals in s["spearman"].items():
        md.append(f"| {key} | " + " | ".join(f"{v:+.2f}" for v in vals) + f" | {statistics.fmean(vals):+.2f} |")
    rel = {p.stem.removeprefix("reliability_"): json.loads(p.read_text())["result"]
           for p in sorted(out_dir.glob("reliability_seed*.json"))}
    if rel:
        s["reliability"] = rel
        md += ["", "## The measurement against itself: the same drops measured on 4,000 other test images", "",
               "| setting, Spearman | " + " | ".join(rel) + " | mean |", "|---|" + "---:|" * (len(rel) + 1)]
        keys = next(iter(rel.values()))
        for setting in keys:
            for m in keys[setting]:
                vals = [rel[k][setting][m] for k in rel]
                md.append(f"| {setting} {m} | " + " | ".join(f"{v:+.2f}" for v in vals)
                          + f" | {statistics.fmean(vals):+.2f} |")
    md += ["", "## Plan minus uniform, top-1 on the 10,000 test images (practical recipe, activations at 4 bits)", "",
           "| row | uniform per seed | plan per seed | plan bits/weight | paired difference (mean ± 95 % CI) |",
           "|---|---|---|---:|---:|"]
    for key, p in s["paired"].items():
        md.append(f"| {key} | " + ", ".join(f"{v:.2f}" for v in p["uniform"]) + " | "
                  + ", ".join(f"{v:.2f}" for v in p["plan"]) + f" | {statistics.fmean(p['plan_bits_per_weight']):.3f} "
                  f"(budget {statistics.fmean(p['budget']):.3f}) | {p['mean']:+.2f} ± {p['ci95']:.2f} |")
    md += ["", "Prediction time / measurement time: " + ", ".join(f"{r:.3f}" for r in s["seconds"]["ratio"])
           + f" (prediction {statistics.fmean(pr):.1f} s, measurement {statistics.fmean(me):.1f} s on average)", ""]
    md += [f"- `{k}.json`: {recs[k]['date']}, commit {recs[k]['commit']}, `{recs[k]['command']}`" for k in seeds]
    write_file_atomic(out_dir / "summary.md", "\n".join(md) + "\n", overwrite=True)
    write_file_atomic(out_dir / "summary.json", json.dumps(s, indent=1) + "\n", overwrite=True)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_model_args(ap)
    ap.add_argument("--weight-bits", default="2,3,4", help="measured weight widths (the measured plans need 2,3,4)")
    ap.add_argument("--act-bits", default="3")
    ap.add_argument("--all-but-bits", default="3", help="widths of the 'all but this layer' measurement")
    ap.add_argument("--choices", default="2,3,4,8", help="the widths a plan may give a layer")
    ap.add_argument("--calib-images", type=int, default=1024)
    ap.add_argument("--predict-images", type=int, default=1024)
    ap.add_argument("--hessian-batches", type=int, default=2)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--train-subset", type=int, default=10_000,
                    help="the training subset the models were trained on (data seed 0): the rest is held out")
    ap.add_argument("--remeasure-images", type=int, default=4000, help="--reliability: test images of the remeasurement")
    ap.add_argument("--out-dir", default="benchmarks/results/sensitivity/cpu")
    ap.add_argument("--summarize", action="store_true", help="only regenerate the summary")
    ap.add_argument("--reliability", action="store_true",
                    help="measure the stored seeds' 'only this layer' drops again on 4,000 other test images")
    ap.add_argument("--overwrite", action="store_true", help="replace existing seed<k>.json files")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    if not args.summarize:
        if args.threads:
            torch.set_num_threads(args.threads)
        from flatq_lightning.app.data import CIFAR10DataModule

        dm = CIFAR10DataModule(args.data, batch_size=128, eval_batch_size=250, train_subset=args.train_subset, seed=0,
                               num_workers=0)
        dm.setup("fit")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        for s, path in cifar_seed_models(args.models, args.seeds):
            out = out_dir / (f"reliability_seed{s}.json" if args.reliability else f"seed{s}.json")
            if out.exists() and not args.overwrite:
                raise SystemExit(f"{out} exists: pass --overwrite to replace it, or --out-dir for a new folder")
            torch.manual_seed(0)
            res = reliability_seed(path, dm, args, out_dir) if args.reliability else evaluate_seed(path, dm, args)
            rec = {"benchmark": "sensitivity" + ("_reliability" if args.reliability else ""), "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
                   "command": "python " + " ".join(sys.argv), "machine": machine(), "result": res}
            write_file_atomic(out, json.dumps(rec, indent=1) + "\n", overwrite=args.overwrite)
    s = summarize(out_dir)
    print((out_dir / "summary.md").read_text())
    return 0 if s["seeds"] else 1


def machine() -> dict[str, Any]:
    import os
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg()), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
