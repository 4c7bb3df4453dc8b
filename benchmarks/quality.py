"""Quality benchmark: does pre-conditioning make plain PTQ work at low bits, and what does it cost?

Trains the same network on the same data and budget as each variant, then runs the project's PTQ
(BN folded, per-channel min-max weights, per-tensor min-max activations, first/last layer at 8 bit) at
W8A8, W4A8, W4A4, W3A3 and W2A4 on the test set, and measures flatness (Hessian trace, top eigenvalue,
a 1-D filter-normalised loss slice) on clean weights.

Each variant is an experiment of the app (``conf/experiment/<name>.yaml``, what ``flatq-train experiment=<name>``
runs) with Hydra overrides (``VARIANTS``), under the benchmark's own training schedule (``recipe_overrides``:
CIFAR ResNet-20, one-cycle to lr 0.2, the size's epochs and data subset, no validation or checkpoints):

    plain            cifar10_resnet20_plain: SGD, no callbacks
    sam              cifar10_resnet20_sam: SAM (rho 0.05) around the same SGD
    dnq_w            cifar10_resnet20_dnq callbacks.dnq.act_noise=false: recorder + differential weight noise
    dnq_wa           cifar10_resnet20_dnq: + activation noise (p = 0.5)
    dnq_wa_mse       + the FP-vs-quantized MSE term (module.mse_weight)
    dnq_wa_addrem    weight noise in add_remove mode instead of differential
    dnq_uniform      DiffQ-style uniform pseudo-quantization weight noise (weights only)
    dnq_wa_trap      dnq_wa with the noise ramped in over the first 20% of the steps and cooled down over the last 20%
    dnq_wa_late      cifar10_resnet20_dnq_w3a3: dnq_wa with no noise in the first half of the steps
    dnq_wa_late_k05  dnq_wa_late at half the noise scale (κ = 0.5 for weights and activations)

A DNQ variant takes its noise statistics from the W4A4 quantizer (``quant=w4a4``) unless a target follows an
``@``: ``dnq_wa@w3a3`` trains with the statistics of the W3A3 quantizer it will meet (``quant=w3a3``; what a user
sweeping bit-widths does: one run per target), so ``dnq_wa_late@w3a3`` is the ``cifar10_resnet20_dnq_w3a3``
experiment as it is. ``--show-config VARIANT`` prints a variant's experiment, overrides and composed config.

Sizes: ``--size cpu`` (CIFAR ResNet-20 on a 10,000-image subset, 10 epochs, batch 128, float32, one seed) and
``--size gpu`` (full CIFAR-10, 30 epochs, batch 256, bf16, 3 seeds). Each finished variant is appended to
``<out>/quality.json`` at once, and a rerun skips what is there (``--fresh`` to start over); the Markdown table
(mean ± std over seeds) and the plots are rebuilt from the JSON.

    python benchmarks/quality.py --size cpu --data ../shared/data/cifar10-jpeg.zip
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# the three parts; the names other scripts and the tests take from ``quality`` are re-exported here
from benchmarks.quality_eval import (  # noqa: E402
    BITS,
    CALIB_IMAGES,
    DEFAULT_RECIPES,
    EVAL_BITS,
    PTQ_RECIPES,
    calib_batches,
    evaluate_all,
    measure_flatness,
    remeasure,
    run_variant,
)
from benchmarks.quality_report import mean_ci95, plots, summarize, summarize_runs, write_report, write_summary  # noqa: E402
from benchmarks.quality_train import (  # noqa: E402
    MSE_WEIGHT,
    SIZES,
    VARIANTS,
    StopOnDivergence,
    fit_variant,
    load_saved,
    make_datamodule,
    run_dir,
    saved_models,
    train_and_save,
    variant_config,
    variant_overrides,
)

__all__ = [
    "BITS", "CALIB_IMAGES", "PTQ_RECIPES", "SIZES", "VARIANTS", "StopOnDivergence", "calib_batches", "fit_variant",
    "load_saved", "main", "make_datamodule", "mean_ci95", "measure_flatness", "plots", "run_variant", "saved_models",
    "summarize", "summarize_runs", "train_and_save", "variant_config", "variant_overrides", "write_summary",
]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line and the size it picks, with its ``--epochs``/``--train-subset``/... overrides."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="cpu")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default=None, help="comma list (default per size)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on a seeded subset of the test set")
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--mse-weight", type=float, default=MSE_WEIGHT, help="λ of the dnq_wa_mse variant")
    ap.add_argument("--bits", default=",".join(BITS))
    ap.add_argument("--out", default="benchmarks/results/quality/cpu")
    ap.add_argument("--flat-batches", type=int, default=1, help="training batches for the Hessian measures")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--merge", action="append", default=[], help="another run's out dir whose results to merge in")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plots from the JSON, train nothing")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--train-only", action="store_true",
                    help="train and save <out>/<variant>/seed<k>.pt and .train.json; no PTQ")
    ap.add_argument("--evaluate", action="store_true",
                    help="train nothing: evaluate every saved <out>/<variant>/seed<k>.pt under --recipes "
                         "(results in seed<k>.json), then write the summary")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help=f"PTQ recipes for --evaluate, from {list(PTQ_RECIPES)}")
    ap.add_argument("--eval-bits", default=",".join(EVAL_BITS), help="bit-widths for --evaluate")
    ap.add_argument("--recon-iters", type=int, default=None,
                    help="steps per block of the reconstruct recipe (default: the library's Reconstruction.iters)")
    ap.add_argument("--summarize", action="store_true", help="only rebuild <out>/summary.{md,json} and the plot")
    ap.add_argument("--remeasure-flatness", action="store_true",
                    help="train nothing: measure Hessian trace and top eigenvalue again on <out>/models/*.pt "
                         "with --flat-batches and --flat-probes")
    ap.add_argument("--flat-probes", type=int, default=16, help="Hutchinson probes for --remeasure-flatness")
    ap.add_argument("--show-config", metavar="VARIANT", default=None,
                    help="print the variant's experiment, overrides and composed config (under the size), train nothing")
    args = ap.parse_args(argv)
    args.bits = tuple(args.bits.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dict(SIZES[args.size])
    if args.epochs:
        size["epochs"] = args.epochs
    if args.train_subset:
        size["train_subset"] = args.train_subset
    if args.test_subset:
        size["test_subset"] = args.test_subset
    if args.seeds:
        size["seeds"] = [int(s) for s in args.seeds.split(",")]
    return args, size


def show_config(args: argparse.Namespace, size: dict[str, Any]) -> None:
    """``--show-config VARIANT``: the variant's overrides and composed config under the size; trains nothing."""
    from omegaconf import OmegaConf

    seed = size["seeds"][0]
    cfg, overrides = variant_config(args.show_config, seed, args, size)
    import shlex

    print(f"# {args.show_config}, seed {seed}: flatq-train \\\n#   " + " \\\n#   ".join(map(shlex.quote, overrides)))
    print(f"# data.path: {args.data}; TOTAL_STEPS: the fit's optimizer steps\n")
    print(OmegaConf.to_yaml(cfg))


def train_only(args: argparse.Namespace, size: dict[str, Any], out: Path) -> None:
    """``--train-only``: train and save every variant and seed not saved yet (all with ``--fresh``)."""
    for seed in size["seeds"]:
        for v in args.variants.split(","):
            if (run_dir(out, v) / f"seed{seed}.pt").exists() and not args.fresh:
                continue
            t0 = time.time()
            path = train_and_save(v, seed, args, size)
            print(f"[{v} seed {seed}] trained in {time.time() - t0:.0f}s -> {path}", flush=True)


def run_all(args: argparse.Namespace, size: dict[str, Any], out: Path) -> None:
    """The default run: train, PTQ and measure every variant and seed not in ``<out>/quality.json`` yet, appending
    each to it at once, then rebuild ``quality.md`` and the plots (``--report-only``: only that;
    ``--remeasure-flatness``: flatness again on the saved models instead)."""
    store = out / "quality.json"
    doc: dict[str, Any] = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
    doc.setdefault("results", [])
    if not args.report_only:
        doc.update(
        {
            "command": "python " + " ".join(sys.argv),
            "size": args.size,
            "settings": {**size, "model": args.model, "lr": args.lr, "rho": args.rho, "bits": list(args.bits)},
            "machine": torch.cuda.get_device_name() if size["accelerator"] == "gpu" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        }
        )
    for other in args.merge:
        have = {(r["variant"], r["seed"]) for r in doc["results"]}
        extra = json.loads((Path(other) / "quality.json").read_text())["results"]
        doc["results"].extend(r for r in extra if (r["variant"], r["seed"]) not in have)
        store.write_text(json.dumps(doc, indent=1))
    if args.remeasure_flatness:
        remeasure(args, size, doc, out)
        return
    done = {(r["variant"], r["seed"]) for r in doc["results"]}
    for seed in [] if args.report_only else size["seeds"]:
        for v in args.variants.split(","):
            if (v, seed) in done:
                continue
            t0 = time.time()
            r = run_variant(v, seed, args, size)
            r["date"] = time.strftime("%Y-%m-%d")
            doc["results"].append(r)
            store.write_text(json.dumps(doc, indent=1))
            print(
                f"[{v} seed {seed}] {time.time() - t0:.0f}s  train {r['train_s']:.0f}s  FP {r['fp_top1']:.2f}  "
                + "  ".join(f"{b} {r['ptq'][b]:.2f}" for b in args.bits)
                + f"  trace {r['flatness']['hessian_trace']:.1f}  eig {r['flatness']['top_eig']:.2f}",
                flush=True,
            )
    print(write_report(doc, args.bits, out))


def main() -> None:
    args, size = parse_args()
    if args.show_config:
        show_config(args, size)
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.eval_bits = tuple(args.eval_bits.split(","))
    if args.evaluate or args.summarize:
        if args.evaluate:
            evaluate_all(args, size, out)
        print(write_summary(out))
        return
    if args.train_only:
        train_only(args, size, out)
        return
    run_all(args, size, out)


if __name__ == "__main__":
    main()
