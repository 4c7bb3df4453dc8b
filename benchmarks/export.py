"""Export benchmark (issue #15): flatq's fake-quant top-1 vs ONNX Runtime's, file sizes, ONNX Runtime latency.

For each model (the CIFAR ResNet-20 of docs/results.md §2, plain training, seed 0; the ViT of §3), at W8A8 and
W4A8 (plain min-max PTQ: BN folded, per-channel weights, per-tensor activations, first/last layer at 8 bit,
1,024 calibration images): ``run_ptq(..., export_formats=("onnx", "safetensors"))`` writes the QDQ ONNX file and
the packed safetensors file and runs the parity check on the full CIFAR-10 test set (top-1 of the flatq model
and of ONNX Runtime on the same images). The FP network is exported to ONNX too, and ONNX Runtime's CPU latency
(median over repeats, models interleaved so that they share the machine's load) is measured for the FP,
W8A8 and W4A8 files in the same run, per batch of 128 test images and for a single image.

Prints a Markdown table and writes JSON (``--out``, default ``benchmarks/results/export/cpu/export.json``);
the model files go to ``--files`` (default ``bench_out/export``, not committed).

    python benchmarks/export.py --threads 1 --data ../shared/data/cifar10-jpeg.zip \\
        --resnet benchmarks/results/quality/cpu/plain/seed0.pt --vit bench_out/export/vit_cifar_d4.pt --train-vit
    python benchmarks/export.py --smoke     # tiny synthetic run of the whole path (seconds), for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from flatq_lightning.ptq.onnx_export import check_onnx_parity, export_onnx, ort_session  # noqa: E402
from flatq_lightning.ptq.runner import run_ptq  # noqa: E402
from flatq_lightning.quant import batch_inputs  # noqa: E402

BITS = ("w8a8", "w4a8")
CALIB_IMAGES = 1024


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import timm

    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
        "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "timm": timm.__version__, "torch_threads": torch.get_num_threads(),
    }


def train_vit(path: Path, dm: Any, args: argparse.Namespace) -> nn.Module:
    """The ViT of docs/results.md §3 (``vit_cifar``, 4 blocks; AdamW lr 1e-3, wd 0.05, warm-up + cosine, label
    smoothing 0.1), trained plain on ``--vit-train-subset`` images for ``--vit-epochs`` epochs; saves its state
    dict (written to a temporary name, then moved)."""
    import lightning.pytorch as pl

    from flatq_lightning.app.models.vit import vit_cifar
    from flatq_lightning.app.module import ImageClassifier

    pl.seed_everything(args.seed, workers=True)
    module = ImageClassifier(vit_cifar(num_classes=10, depth=args.vit_depth), optimizer="adamw", lr=1e-3,
                             weight_decay=0.05, betas=(0.9, 0.999), scheduler="cosine", warmup_fraction=0.1,
                             label_smoothing=0.1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.vit_epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=dm)
    print(f"[vit] trained {trainer.global_step} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    net = module.model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    tmp.replace(path)
    return net


def load_state(net: nn.Module, path: Path) -> nn.Module:
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # a file is untrusted input
    return net.eval()


def latency(sessions: dict[str, Any], x: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Median (and quartiles) of ONNX Runtime's wall time per ``run`` on ``x``, in ms; the sessions take turns
    (one run each per round) so that they see the same machine load."""
    feed = x.numpy()
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {"input": feed})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"input": feed})
            times[k].append((time.perf_counter() - t) * 1e3)
    out = {}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) >= 4 else [min(v), statistics.median(v), max(v)]
        out[k] = {"median_ms": statistics.median(v), "q1_ms": q[0], "q3_ms": q[2], "repeats": len(v)}
    return out


def report_model(net: nn.Module, bits: str, calib: list[torch.Tensor]) -> nn.Module:
    """The quantized model ``run_ptq`` built for ``bits``: same calibration batches, same settings (quantizing
    is deterministic), so the second parity pass compares ONNX Runtime with the model the file was made from."""
    from flatq_lightning.quant import QuantSpec, fold_batchnorm, quantize_model

    return quantize_model(fold_batchnorm(net), *QuantSpec.parse(bits), calib_batches=calib)


def bench_model(name: str, net: nn.Module, dm: Any, args: argparse.Namespace, files_dir: Path) -> dict[str, Any]:
    test = dm.test_dataloader()
    # the calibration batches, drawn once: the loader reshuffles on every pass
    n_calib = max(1, args.calib_images // args.batch_size)
    calib = [batch_inputs(b) for _, b in zip(range(n_calib), dm.calib_dataloader(args.batch_size))]
    d = files_dir / name
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = run_ptq(net, calib, test, bits=BITS, calib_batches=n_calib,
                     progress=False, export_dir=d, export_formats=("onnx", "safetensors"), overwrite=True,
                     export_metadata={"model": name})
    ptq_s = time.perf_counter() - t0
    x = batch_inputs(next(iter(test)))
    fp_onnx = export_onnx(net, d / "fp.onnx", x[:1], overwrite=True)
    fp_parity = check_onnx_parity(net, fp_onnx, test)
    from safetensors.torch import save_file

    fp_st = d / "fp.safetensors"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}, str(fp_st))
    threads = args.threads or torch.get_num_threads()
    sessions = {"fp": ort_session(fp_onnx, threads=threads)}
    rows: dict[str, Any] = {"fp": {"top1_flatq": report.fp_top1, "top1_ort": fp_parity.top1_ort,
                                   "agreement": fp_parity.agreement, "max_abs_logit_diff": fp_parity.max_abs_logit_diff,
                                   "onnx_bytes": fp_onnx.stat().st_size, "safetensors_bytes": fp_st.stat().st_size}}
    for b in BITS:
        row = report.row(b)
        onnx_e = next(e for e in row.exports if e["format"] == "onnx")
        st_e = next(e for e in row.exports if e["format"] == "safetensors")
        sessions[b] = ort_session(onnx_e["path"], threads=threads)
        sessions[f"{b}_nofusion"] = nf = ort_session(onnx_e["path"], threads=threads, qdq_fusion=False)
        p_nf = check_onnx_parity(report_model(net, b, calib), nf, test) if args.parity_nofusion else None
        rows[b] = {"top1_report": row.top1, "top1_flatq": onnx_e["top1_flatq"], "top1_ort": onnx_e["top1_ort"],
                   "agreement": onnx_e["agreement"], "max_abs_logit_diff": onnx_e["max_abs_logit_diff"],
                   "mean_abs_logit_diff": onnx_e["mean_abs_logit_diff"], "samples": onnx_e["samples"],
                   "onnx_bytes": onnx_e["bytes"], "safetensors_bytes": st_e["bytes"],
                   "nofusion": p_nf.to_dict() if p_nf is not None else None}
    lat = {"batch": latency(sessions, x, args.repeats), "single": latency(sessions, x[:1], args.repeats_single)}
    for k in rows:
        for kind in ("batch", "single"):
            rows[k][f"latency_{kind}_ms"] = lat[kind][k]
            if k != "fp":
                rows[k][f"latency_{kind}_nofusion_ms"] = lat[kind][f"{k}_nofusion"]
    return {"model": name, "params": sum(p.numel() for p in net.parameters()), "eval_images": report.num_eval_samples,
            "batch_size": int(x.shape[0]), "ptq_and_parity_s": ptq_s, "rows": rows}


def table(results: list[dict[str, Any]]) -> str:
    bs = results[0]["batch_size"] if results else 0
    lines = ["| model | bits | top-1 flatq (%) | top-1 ONNX Runtime (%) | argmax agree (%) | max abs Δ logit | "
             f"ONNX size | safetensors size | ORT ms / batch of {bs} | ORT ms / image | "
             f"ORT ms / batch, QDQ fusion off | ORT ms / image, QDQ fusion off | top-1 ORT / agree, QDQ fusion off (%) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for k, v in r["rows"].items():
            nf = v.get("nofusion") or {}
            off = ("—", "—", "—") if k == "fp" else (
                f"{v['latency_batch_nofusion_ms']['median_ms']:.1f}", f"{v['latency_single_nofusion_ms']['median_ms']:.2f}",
                f"{nf['top1_ort']:.2f} / {nf['agreement']:.2f}" if nf else "—")
            lines.append(
                f"| {r['model']} | {k.upper() if k != 'fp' else 'FP'} | {v['top1_flatq']:.2f} | {v['top1_ort']:.2f} | "
                f"{v['agreement']:.2f} | {v['max_abs_logit_diff']:.3f} | {v['onnx_bytes'] / 1024:.0f} KiB | "
                f"{v['safetensors_bytes'] / 1024:.0f} KiB | {v['latency_batch_ms']['median_ms']:.1f} | "
                f"{v['latency_single_ms']['median_ms']:.2f} | " + " | ".join(off) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.zip", help="CIFAR-10 zip/folder")
    ap.add_argument("--resnet", default="benchmarks/results/quality/cpu/plain/seed0.pt",
                    help="state dict of a cifar_resnet20 (benchmarks/quality.py --train-only writes them)")
    ap.add_argument("--vit", default="bench_out/export/vit_cifar_d4.pt", help="state dict of the ViT")
    ap.add_argument("--train-vit", action="store_true", help="train the ViT first when --vit does not exist")
    ap.add_argument("--vit-depth", type=int, default=4)
    ap.add_argument("--vit-epochs", type=int, default=6)
    ap.add_argument("--vit-train-subset", type=int, default=4000)
    ap.add_argument("--models", default="resnet20,vit")
    ap.add_argument("--batch-size", type=int, default=128, help="evaluation, calibration and latency batch")
    ap.add_argument("--calib-images", type=int, default=CALIB_IMAGES)
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats per model, batch of 128")
    ap.add_argument("--repeats-single", type=int, default=300, help="latency repeats per model, one image")
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--no-parity-nofusion", dest="parity_nofusion", action="store_false",
                    help="skip the second parity pass with ONNX Runtime's QDQ fusion off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--files", default="bench_out/export", help="where the ONNX/safetensors files go")
    ap.add_argument("--out", default="benchmarks/results/export/cpu/export.json")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic models and data: the path, in seconds")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    files_dir = Path(args.files)
    results = []
    models = [m for m in args.models.split(",") if m]
    if args.smoke:
        from flatq_lightning.app.data import SyntheticDataModule
        from flatq_lightning.app.models import create_model

        args.repeats, args.repeats_single, args.calib_images, args.batch_size = 3, 3, 32, 16
        dm = SyntheticDataModule(num_samples=64, val_samples=32, num_classes=10, image_size=32, batch_size=16)
        dm.setup("fit")
        from flatq_lightning.app.models.vit import vit_cifar

        nets = {"resnet20": create_model("cifar_resnet20", num_classes=10).eval(),
                "vit": vit_cifar(num_classes=10, depth=1).eval()}
        results = [bench_model(m, nets[m], dm, args, files_dir) for m in models]
    else:
        from flatq_lightning.app.data import CIFAR10DataModule
        from flatq_lightning.app.models import create_model
        from flatq_lightning.app.models.vit import vit_cifar

        dm = CIFAR10DataModule(args.data, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                               train_subset=10_000, seed=0, num_workers=0)
        dm.setup("fit")
        for m in models:
            if m == "resnet20":
                net = load_state(create_model("cifar_resnet20", num_classes=10), Path(args.resnet))
            elif m == "vit":
                path = Path(args.vit)
                if path.exists():
                    net = load_state(vit_cifar(num_classes=10, depth=args.vit_depth), path)
                elif args.train_vit:
                    vdm = CIFAR10DataModule(args.data, batch_size=128, train_subset=args.vit_train_subset, seed=0,
                                            num_workers=0)
                    net = train_vit(path, vdm, args)
                else:
                    raise SystemExit(f"--vit {path} does not exist: pass --train-vit to train it first")
            else:
                raise SystemExit(f"unknown model {m!r}: resnet20, vit")
            t0 = time.perf_counter()
            results.append(bench_model(m, net, dm, args, files_dir))
            print(f"[{m}] {time.perf_counter() - t0:.0f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"benchmark": "export", "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
              "command": "python " + " ".join(sys.argv), "config": vars(args), "machine": machine(),
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)
    print(table(results))
    print(f"\nJSON in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
