"""How much of a PTQ accuracy is the calibration draw? PTQ of saved models with several calibration sets.

The quality benchmark calibrates each model once, on the first 1,024 augmented training images the loader
happens to give. At 3 bits with per-tensor min-max activation ranges, a single extreme activation moves a range,
so the accuracy of one model can depend on which images were drawn. This script takes the models that
``benchmarks/quality.py`` saved (``<dir>/models/<variant>_seed<seed>.pt``), runs the project's PTQ at the given
bit-widths with ``--draws`` calibration sets (seeded shuffles of the training subset), evaluates each on the full
test set and prints mean ± std and min–max per model and bit-width; a JSON file is written beside the models.

    python benchmarks/calib_spread.py --dir benchmarks/results/quality/cpu_2026-11/plain+dnq_wa+sam_seed1 --bits w4a4,w3a3 --draws 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from quality import SIZES, calib_batches, load_saved, make_datamodule, saved_models  # noqa: E402

from flatq_lightning.ptq.runner import run_ptq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="a quality.py --out directory with models/*.pt")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--bits", default="w4a4,w3a3")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--size", default="cpu", choices=sorted(SIZES), help="the quality.py size the models were trained at")
    ap.add_argument("--train-subset", type=int, default=None, help="override the size's training subset (as quality.py)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma list of model file stems to use (default: all)")
    args = ap.parse_args()
    if args.draws < 1:
        ap.error("--draws must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    paths = saved_models(Path(args.dir))
    if args.only:
        keep = set(args.only.split(","))
        paths = [p for p in paths if p.stem in keep]
    if not paths:
        ap.error(f"no models/*_seed*.pt under {args.dir} (run benchmarks/quality.py first)")
    bits = args.bits.split(",")
    size = dict(SIZES[args.size])
    if args.train_subset:
        size["train_subset"] = args.train_subset
    dm = make_datamodule(args.data, size)  # the same training subset and calibration size as quality.py
    test = dm.test_dataloader()
    rows = []
    for path in paths:
        net = load_saved(path, args.model)
        acc: dict[str, list[float]] = {b: [] for b in bits}
        fp = None
        for d in range(args.draws):
            pl.seed_everything(1000 + d, verbose=False)  # the shuffle and augmentation of this draw
            report = run_ptq(net, dm.train_dataloader(), test, bits=bits, calib_batches=calib_batches(size), progress=False)
            fp = report.fp_top1
            for r in report.rows:
                acc[r.bits].append(r.top1)
        row = {"model": path.stem, "fp_top1": fp, "draws": args.draws, "top1": acc,
               "mean": {b: statistics.mean(v) for b, v in acc.items()},
               "std": {b: statistics.stdev(v) if len(v) > 1 else 0.0 for b, v in acc.items()}}
        rows.append(row)
        print(f"{path.stem}: FP {fp:.2f}  " + "  ".join(
            f"{b} {row['mean'][b]:.2f} ± {row['std'][b]:.2f} [{min(acc[b]):.2f}–{max(acc[b]):.2f}]" for b in bits), flush=True)
    out = Path(args.dir) / "calib_spread.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
                               "calib_batches": calib_batches(size), "batch_size": size["batch_size"], "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
