"""Wall-clock time of ``run_ptq`` on a CIFAR ResNet-20 at five bit-widths (synthetic 32×32 data).

Timing only: the network is untrained and the data random, so the accuracies printed mean nothing.

    .venv/bin/python benchmarks/ptq_timing.py --n-eval 10000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from flatq_lightning import run_ptq  # noqa: E402
from flatq_lightning.app.models import cifar_resnet20  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-eval", type=int, default=10_000)
    ap.add_argument("--calib-batches", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--calib-batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w4a4", "w3a3", "w2a4"])
    ap.add_argument("--out", default=None, help="write the timing JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = cifar_resnet20(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    xe, ye = torch.randn(args.n_eval, 3, 32, 32, generator=g), torch.randint(0, 10, (args.n_eval,), generator=g)
    n_cal = args.calib_batches * args.calib_batch_size
    xc, yc = torch.randn(n_cal, 3, 32, 32, generator=g), torch.randint(0, 10, (n_cal,), generator=g)
    eval_loader = DataLoader(TensorDataset(xe, ye), batch_size=args.batch_size)
    calib_loader = DataLoader(TensorDataset(xc, yc), batch_size=args.calib_batch_size, shuffle=True)
    t = time.perf_counter()
    rep = run_ptq(net, calib_loader, eval_loader, bits=args.bits, calib_batches=args.calib_batches,
                  device=args.device, progress=False)
    total = time.perf_counter() - t
    result = {
        "model": type(net).__name__,
        "params": sum(p.numel() for p in net.parameters()),
        "n_eval": args.n_eval,
        "calib": f"{args.calib_batches}x{args.calib_batch_size}",
        "bits": rep.bits,
        "threads": args.threads,
        "device": rep.device,
        "load_avg_1m": os.getloadavg()[0],
        "total_s": round(total, 2),
        "timing": {k: round(v, 2) for k, v in rep.timing.items()},
        "per_bits_s": {r.bits: {"quantize": round(r.quantize_seconds, 2), "eval": round(r.eval_seconds, 2)}
                       for r in rep.rows},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
