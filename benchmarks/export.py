"""Export benchmark (issues #15, #21): does the quantized ONNX file run faster than FP in ONNX Runtime, and is it
as accurate as ONNX Runtime's own static quantization?

For each model (the CIFAR ResNet-20 of docs/results.md §2, plain training, seed 0; timm ``resnet18`` and
``mobilenetv2_100`` at 32 px, untrained unless a state dict is given: latency rows only; the ViT of §3), the
files it compares, all from the same FP network and the same 1,024 calibration images:

- ``fp``: the FP network exported by ``export_onnx``;
- ``w8a8_layer_inputs``: flatq W8A8 min-max PTQ (BN folded, per-channel weights, per-tensor activations,
  first/last layer at 8 bit) with quantizers at the quantized layers' inputs (the placement before #21);
- ``w8a8_onnxruntime``: the same with the ``"onnxruntime"`` placement (residual adds and pooling inputs too);
- ``ort_static_w8a8``: ``onnxruntime.quantization.quantize_static`` on the ``fp`` file after its
  ``quant_pre_process`` (QDQ format, per-channel int8 weights, uint8 activations, min-max calibration);
- ``w4a8_onnxruntime``: flatq W4A8 with the ``"onnxruntime"`` placement, weights stored as int4;
- ``w4a8_onnxruntime_int8``: the same model with its 4-bit codes stored in int8 (``pack_int4=False``).

For each file: top-1 on the test set through ONNX Runtime (and of the flatq fake-quant model it was made from,
with the argmax agreement), the convolutions and matrix products ONNX Runtime runs on integer and on float
kernels after its graph optimisation (``ort_kernels``), the file size, and ONNX Runtime's CPU latency: median and
interquartile range over repeats, the files taking turns within each round, for one thread and for all threads,
on a batch of 128 test images and on one image.

Writes one JSON file per model (``--out-dir``, default ``benchmarks/results/export/cpu``: ``<model>.json``) and a
generated ``summary.md`` there, and prints the table; the model files go to ``--files`` (not committed).

    python benchmarks/export.py --data ../shared/data/cifar10-jpeg.zip --models resnet20,resnet18,mobilenetv2,vit \
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


VARIANTS: tuple[tuple[str, str | None, str, bool], ...] = (
    # (key, bits, placement, int4 container)
    ("fp", None, "layer_inputs", False),
    ("w8a8_layer_inputs", "w8a8", "layer_inputs", False),
    ("w8a8_onnxruntime", "w8a8", "onnxruntime", False),
    ("ort_static_w8a8", None, "layer_inputs", False),
    ("w4a8_onnxruntime", "w4a8", "onnxruntime", True),
    ("w4a8_onnxruntime_int8", "w4a8", "onnxruntime", False),
)
LABELS = {"fp": "FP", "w8a8_layer_inputs": "flatq W8A8, layer inputs", "w8a8_onnxruntime": "flatq W8A8, onnxruntime",
          "ort_static_w8a8": "ORT quantize_static W8A8", "w4a8_onnxruntime": "flatq W4A8, onnxruntime, int4",
          "w4a8_onnxruntime_int8": "flatq W4A8, onnxruntime, int8 storage"}


def ort_static(fp_path: Path, out: Path, calib: list[torch.Tensor]) -> Path:
    """ONNX Runtime's own static quantization of ``fp_path`` as its documentation shows it: ``quant_pre_process``,
    then ``quantize_static`` in QDQ format, per-channel int8 weights, uint8 activations, min-max calibration on
    ``calib``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(f"{out.stem}_preprocessed.onnx")
    quant_pre_process(str(fp_path), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": c.detach().cpu().float().numpy()} for c in calib])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def bench_model(name: str, net: nn.Module, dm: Any, args: argparse.Namespace, files_dir: Path,
                trained: bool = True) -> dict[str, Any]:
    from flatq_lightning.ptq.onnx_export import ort_kernels
    from flatq_lightning.quant import fold_batchnorm, quantize_model

    test = list(dm.test_dataloader())
    if args.eval_images:
        test = test[: max(1, args.eval_images // args.batch_size)]
    # the calibration batches, drawn once and shared by every file
    n_calib = max(1, args.calib_images // args.batch_size)
    calib = [batch_inputs(b) for _, b in zip(range(n_calib), dm.calib_dataloader(args.batch_size))]
    d = files_dir / name
    d.mkdir(parents=True, exist_ok=True)
    x = batch_inputs(test[0])
    all_threads = args.threads or os.cpu_count() or 1
    folded = fold_batchnorm(net)
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    t0 = time.perf_counter()
    for key, bits, placement, int4 in VARIANTS:
        t = time.perf_counter()
        path = d / f"{key}.onnx"
        model = net
        if key == "fp":
            export_onnx(net, path, x[:1], overwrite=True)
        elif key == "ort_static_w8a8":
            path.unlink(missing_ok=True)
            ort_static(paths["fp"], path, calib)
        else:
            model = quantize_model(folded, bits, calib_batches=calib, placement=placement)
            export_onnx(model, path, x[:1], pack_int4=int4, overwrite=True)
        paths[key] = path
        parity = check_onnx_parity(model, path, test, threads=all_threads)
        kernels = ort_kernels(path)
        rows[key] = {"label": LABELS[key], "bits": bits or ("w8a8" if key.startswith("ort_static") else "fp"),
                     "placement": placement if bits else None,
                     "top1_flatq": parity.top1_flatq if key != "ort_static_w8a8" else None,
                     "top1_fp_model": parity.top1_flatq if key == "ort_static_w8a8" else None,
                     "top1_ort": parity.top1_ort, "agreement": parity.agreement,
                     "max_abs_logit_diff": parity.max_abs_logit_diff, "samples": parity.samples,
                     "onnx_bytes": path.stat().st_size, "kernels": kernels, "build_and_eval_s": time.perf_counter() - t}
        print(f"[{name}] {key}: top-1 ORT {parity.top1_ort:.2f} (flatq {parity.top1_flatq:.2f}, agree "
              f"{parity.agreement:.2f}), integer/float kernels {kernels['integer']}/{kernels['float']}, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    lat: dict[str, Any] = {}
    for threads in sorted({1, all_threads}):
        sessions = {k: ort_session(p, threads=threads) for k, p in paths.items()}
        lat[f"threads{threads}"] = {"batch": latency(sessions, x, args.repeats),
                                    "single": latency(sessions, x[:1], args.repeats_single)}
        del sessions
    for key, row in rows.items():
        row["latency_ms"] = {t: {kind: v[kind][key] for kind in v} for t, v in lat.items()}
        row["speedup_vs_fp"] = {t: {kind: v[kind]["fp"]["median_ms"] / v[kind][key]["median_ms"] for kind in v}
                                for t, v in lat.items()}
    return {"model": name, "trained": trained, "params": sum(p.numel() for p in net.parameters()),
            "eval_images": rows["fp"]["samples"], "batch_size": int(x.shape[0]), "threads": sorted({1, all_threads}),
            "seconds": time.perf_counter() - t0, "rows": rows}


def _lat(v: dict[str, float], digits: int = 1) -> str:
    return f"{v['median_ms']:.{digits}f} [{v['q1_ms']:.{digits}f}–{v['q3_ms']:.{digits}f}]"


def table(results: list[dict[str, Any]]) -> str:
    """One row per model and file: accuracy, kernels, size, latency (median [IQR]) and speed-up over FP."""
    if not results:
        return ""
    bs = results[0]["batch_size"]
    ts = results[0]["threads"]
    head = ["model", "file", "top-1 ORT (%)", "top-1 flatq (%)", "argmax agree (%)", "integer / float convs+matmuls",
            "ONNX size"]
    for t in ts:
        head += [f"ms / batch of {bs}, {t} thr", f"ms / image, {t} thr", f"speed-up vs FP, batch, {t} thr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in results:
        for key, v in r["rows"].items():
            top1 = f"{v['top1_ort']:.2f}" if r["trained"] else f"({v['top1_ort']:.2f}, untrained)"
            flat = v["top1_flatq"]
            cells = [r["model"], v["label"], top1, f"{flat:.2f}" if flat is not None else "–",
                     f"{v['agreement']:.2f}" if key != "ort_static_w8a8" else f"({v['agreement']:.2f} with FP)",
                     f"{v['kernels']['integer']} / {v['kernels']['float']}", f"{v['onnx_bytes'] / 1024:.0f} KiB"]
            for t in ts:
                lat, sp = v["latency_ms"][f"threads{t}"], v["speedup_vs_fp"][f"threads{t}"]
                cells += [_lat(lat["batch"]), _lat(lat["single"], 2), f"{sp['batch']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def summarize(out_dir: Path) -> str:
    """summary.md from every ``<model>.json`` in ``out_dir`` (the table, each file's date, command and machine)."""
    recs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    recs = [r for r in recs if r.get("benchmark") == "export" and "result" in r]
    md = ["# Export benchmark: generated by `python benchmarks/export.py` (do not edit)", ""]
    md.append(table([r["result"] for r in recs]))
    md.append("")
    for r in recs:
        m = r["machine"]
        md.append(f"- `{r['result']['model']}.json`: {r['date']}, commit {r['commit']}, {m['cpu']} ({m['cores']} cores), "
                  f"ONNX Runtime {m['onnxruntime']}, torch {m['torch']}; `{r['command']}`")
    text = "\n".join(md) + "\n"
    _write_atomic(out_dir / "summary.md", text)
    return text


MODELS = ("resnet20", "resnet18", "mobilenetv2", "vit")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.zip", help="CIFAR-10 zip/folder")
    ap.add_argument("--resnet", default="benchmarks/results/quality/cpu/plain/seed0.pt",
                    help="state dict of a cifar_resnet20 (benchmarks/quality.py --train-only writes them)")
    ap.add_argument("--resnet18", default=None, help="state dict of timm resnet18 (10 classes); untrained if absent")
    ap.add_argument("--mobilenetv2", default=None, help="state dict of timm mobilenetv2_100; untrained if absent")
    ap.add_argument("--vit", default="bench_out/export/vit_cifar_d4.pt", help="state dict of the ViT")
    ap.add_argument("--train-vit", action="store_true", help="train the ViT first when --vit does not exist")
    ap.add_argument("--vit-depth", type=int, default=4)
    ap.add_argument("--vit-epochs", type=int, default=6)
    ap.add_argument("--vit-train-subset", type=int, default=4000)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--batch-size", type=int, default=128, help="evaluation, calibration and latency batch")
    ap.add_argument("--calib-images", type=int, default=CALIB_IMAGES)
    ap.add_argument("--eval-images", type=int, default=0, help="test images for the accuracy rows (0: all)")
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats per file, batch of 128")
    ap.add_argument("--repeats-single", type=int, default=300, help="latency repeats per file, one image")
    ap.add_argument("--threads", type=int, default=None,
                    help="the 'all threads' setting (default: every core); one thread is always measured too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--files", default="bench_out/export", help="where the ONNX files go")
    ap.add_argument("--out-dir", default="benchmarks/results/export/cpu", help="<model>.json and summary.md")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic models and data: the path, in seconds")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}: choose from {', '.join(MODELS)}")
    torch.manual_seed(args.seed)
    files_dir, out_dir = Path(args.files), Path(args.out_dir)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    from flatq_lightning.app.models import create_model
    from flatq_lightning.app.models.vit import vit_cifar

    if args.smoke:
        from flatq_lightning.app.data import SyntheticDataModule

        args.repeats, args.repeats_single, args.calib_images, args.batch_size = 3, 3, 32, 16
        dm = SyntheticDataModule(num_samples=64, val_samples=32, num_classes=10, image_size=32, batch_size=16)
    else:
        from flatq_lightning.app.data import CIFAR10DataModule

        dm = CIFAR10DataModule(args.data, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                               train_subset=10_000, seed=0, num_workers=0)
    dm.setup("fit")
    results = []
    for m in models:
        trained = True
        if args.smoke:
            net = {"resnet20": lambda: create_model("cifar_resnet20", num_classes=10),
                   "resnet18": lambda: create_model("test_resnet", num_classes=10),
                   "mobilenetv2": lambda: create_model("mobilenetv2_035", num_classes=10),
                   "vit": lambda: vit_cifar(num_classes=10, depth=1)}[m]().eval()
        elif m == "resnet20":
            net = load_state(create_model("cifar_resnet20", num_classes=10), Path(args.resnet))
        elif m in ("resnet18", "mobilenetv2"):
            net = create_model("resnet18" if m == "resnet18" else "mobilenetv2_100", num_classes=10).eval()
            weights = getattr(args, m)
            trained = weights is not None
            if trained:
                net = load_state(net, Path(weights))
        else:
            path = Path(args.vit)
            if path.exists():
                net = load_state(vit_cifar(num_classes=10, depth=args.vit_depth), path)
            elif args.train_vit:
                vdm = CIFAR10DataModule(args.data, batch_size=128, train_subset=args.vit_train_subset, seed=0,
                                        num_workers=0)
                net = train_vit(path, vdm, args)
            else:
                raise SystemExit(f"--vit {path} does not exist: pass --train-vit to train it first")
        res = bench_model(m, net, dm, args, files_dir, trained=trained)
        results.append(res)
        record = {"benchmark": "export", "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
                  "command": "python " + " ".join(sys.argv), "config": vars(args), "machine": machine(),
                  "result": res}
        _write_atomic(out_dir / f"{m}.json", json.dumps(record, indent=1) + "\n")
        print(f"[{m}] {res['seconds']:.0f} s -> {out_dir / (m + '.json')}", flush=True)
    print(table(results))
    summarize(out_dir)
    print(f"\nJSON and summary.md in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
