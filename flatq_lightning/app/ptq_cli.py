"""``flatq-ptq``: post-training quantization of an :class:`~flatq_lightning.app.module.ImageClassifier` checkpoint.

::

    flatq-ptq outputs/.../checkpoints/last.ckpt                      # data module rebuilt from the checkpoint
    flatq-ptq model.ckpt --bits w8a8,w4a4,w3a3 --data cifar10 --data-path ../shared/data/cifar10-jpeg.zip \\
        --calib-batches 32 --save-dir ptq_out

Folds BatchNorm, calibrates on training images (no augmentation), quantizes at each bit-width and evaluates
on the test split with :func:`flatq_lightning.ptq.runner.run_ptq`; prints the accuracy table and writes
``ptq_report.{json,md,csv,png}`` into ``--save-dir`` (default: ``ptq_<checkpoint name>`` beside the checkpoint).
A second run keeps the first report and writes ``ptq_report_2.*`` (``--overwrite`` replaces it instead).

How each copy is made is the PTQ recipe (:class:`~flatq_lightning.ptq.recipe.PTQRecipe`): ``--recipe`` picks a
preset (``minmax``, the default; ``practical``; ``reconstruct``) and the other recipe flags replace its fields
(``--observer``, ``--act-observer``, ``--bn-reestimate``/``--no-bn-reestimate``, ``--bn-batches``; the
reconstruction's ``--recon-iters``, ``--recon-batch-size``, ``--recon-images``, ``--drop-prob``, ``--recon-seed``,
any of which turns reconstruction on for a recipe without it)::

    flatq-ptq model.ckpt --bits w4a4,w3a3 --recipe reconstruct --recon-iters 200

``--export onnx`` (``safetensors``, or ``onnx,safetensors``) also writes each quantized model into the same
folder, ``quantized_<bits>.onnx`` (QuantizeLinear/DequantizeLinear, needs ``pip install "flatq_lightning[onnx]"``)
and/or ``quantized_<bits>.safetensors`` (packed integer weights), and checks every ONNX file in ONNX Runtime on
the test split against the flatq model (top-1 of both, argmax agreement, largest logit difference)::

    flatq-ptq model.ckpt --bits w8a8,w4a8 --export onnx --save-dir deploy
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "datamodule_from_checkpoint", "main", "recipe_from_args"]

_DEFAULT_BITS = "w8a8,w4a8,w4a4,w3a3,w2a4"


class _CliError(Exception):
    pass


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default; on/off switches, and options whose help states their default
    (``default: the recipe's``), say what they do instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or (action.default is None and "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``flatq-ptq: error: ...`` line (like the errors found later), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


#: the recipe flags: ``(flag, PTQRecipe field or reconstruction setting, type, help)``; ``None`` = the recipe's
_RECIPE_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--observer", "observer", str, "weight observer, and activation observer unless --act-observer or the recipe "
     "sets one"),
    ("--act-observer", "act_observer", str, "activation observer"),
    ("--bn-reestimate", "bn_reestimate", bool, "re-estimate BatchNorm statistics per bit-width on the quantized "
     "network before folding (--no-bn-reestimate: keep the trained ones)"),
    ("--bn-batches", "bn_batches", int, "training batches for the BN re-estimation"),
    ("--placement", "placement", str, "where activation quantizers go: layer_inputs (the quantized layers' "
     "inputs) or onnxruntime (also residual adds and pooling inputs: integer kernels in ONNX Runtime)"),
    ("--recon-iters", "iters", int, "block reconstruction (this flag or the next four turn it on, their defaults for "
     "the rest): optimisation steps per block"),
    ("--recon-batch-size", "batch_size", int, "block reconstruction: images per step"),
    ("--recon-images", "calib_images", int, "block reconstruction: calibration images it caches and learns on"),
    ("--drop-prob", "drop_prob", float, "block reconstruction: QDrop probability of keeping an activation in float"),
    ("--recon-seed", "seed", int, "block reconstruction: seed of the batch draws and drop masks"),
)


def build_parser() -> argparse.ArgumentParser:
    # heavy imports stay inside the functions so that --help answers without torch
    from flatq_lightning.ptq.recipe import RECIPES
    from flatq_lightning.quant.spec import OBSERVERS

    p = _Parser(
        prog="flatq-ptq",
        description="Post-training quantization of an ImageClassifier checkpoint at several bit-widths.",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument(
        "checkpoint", help="a Lightning checkpoint written by flatq-train or any ImageClassifier fit"
    )
    p.add_argument("--bits", default=_DEFAULT_BITS, help="comma-separated presets")
    p.add_argument(
        "--data",
        default=None,
        help="data module name (digits, synthetic, cifar10, cifar100, imagenet); default: the one recorded "
        "in the checkpoint",
    )
    p.add_argument("--data-path", default=None, help="data location (CIFAR zip/folder, ImageNet root)")
    p.add_argument("--cache-dir", default=None, help="cache for decoded CIFAR arrays")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation/calibration batch size")
    p.add_argument("--num-workers", type=int, default=None, help="dataloader workers")
    p.add_argument("--calib-batches", type=int, default=32, help="calibration batches")
    p.add_argument("--recipe", default="minmax", choices=tuple(RECIPES),
                   help="PTQ recipe: minmax (min-max ranges, BN as trained), practical (MSE weight clipping, "
                   "percentile activation ranges, BN re-estimated per bit-width), reconstruct (practical + block "
                   "reconstruction); the flags below replace its fields")
    for flag, _field, kind, text in _RECIPE_FLAGS:
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default: the recipe's)")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"{text} (default: the recipe's)",
                           **({"choices": OBSERVERS} if "observer" in flag else {}))
    p.add_argument("--bn-stats", default="clean", choices=("clean", "noisy"),
                   help="start from the checkpoint's BatchNorm statistics re-estimated on clean weights (the "
                   "model's own, default) or from those gathered under DNQ noise (kept in the checkpoint as "
                   "'flatq_noisy_bn')")
    p.add_argument(
        "--no-keep-first-last-8bit",
        dest="keep_first_last_8bit",
        action="store_false",
        help="quantize the first and last layer at the requested bits too",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--save-dir", default=None, help="where the reports go")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier ptq_report.* in the save directory (default: keep it, write ptq_report_<n>.*)",
    )
    p.add_argument("--export", default="", metavar="FORMATS",
                   help="also write each quantized model: onnx (QDQ, checked in ONNX Runtime on the test split), "
                   "safetensors (packed integer weights), or onnx,safetensors")
    p.add_argument("--parity-batches", type=int, default=None,
                   help="test batches for the ONNX Runtime parity check (default: the whole test split)")
    p.add_argument("--budget", type=float, default=None, metavar="BITS",
                   help="also a mixed-precision plan: average weight bits per weight (e.g. 3.5); each layer's weight "
                   "width is chosen among --bits-choices by an exact knapsack over its predicted sensitivity, and "
                   "every --bits entry gets a '<bits>-mixed' row with the plan's weights")
    p.add_argument("--bits-choices", default="2,3,4,8", help="the weight widths a plan may give a layer")
    p.add_argument("--plan-images", type=int, default=1024,
                   help="labelled held-out images the plan's prediction uses (the validation split; the test split "
                   "when the data has none)")
    p.add_argument("--sensitivity", action="store_true",
                   help="also analyse per-layer sensitivity (predicted and measured on the test split, weights and "
                   "activations at --sensitivity-bits): sensitivity.json/.md/.png in the save directory")
    p.add_argument("--sensitivity-bits", type=int, default=3, help="the width of the sensitivity analysis")
    p.add_argument("--sensitivity-images", type=int, default=2000, help="test images the measurement uses")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress (default: a bar on a terminal, a few plain lines in a log)")
    return p


def recipe_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~flatq_lightning.ptq.recipe.PTQRecipe` of ``--recipe`` with the recipe flags given laid over
    it (:meth:`PTQRecipe.replace`); a bad value is a one-line error naming its flag.

    Example:
        >>> r = recipe_from_args(build_parser().parse_args(["m.ckpt", "--recipe", "practical", "--recon-iters", "50"]))
        >>> r.name, r.observer, r.reconstruction.iters, r.reconstruction.drop_prob
        ('practical', 'mse', 50, 0.5)
    """
    from flatq_lightning.ptq.recipe import PTQRecipe

    given = [(flag, field, getattr(args, flag[2:].replace("-", "_"))) for flag, field, _, _ in _RECIPE_FLAGS]
    given = [(flag, field, v) for flag, field, v in given if v is not None]
    for flag, field, v in given:  # one at a time first, so that the error names the flag
        try:
            PTQRecipe.preset(args.recipe, **{field: v})
        except ValueError as err:
            raise _CliError(f"{flag} {v}: {err}") from None
    try:
        return PTQRecipe.preset(args.recipe, **{field: v for _, field, v in given})
    except ValueError as err:
        raise _CliError(f"--recipe {args.recipe} with {' '.join(f'{f} {v}' for f, _, v in given)}: {err}") from None


def _load_raw(path: Path) -> dict[str, Any]:
    """The checkpoint as a dict, read with ``weights_only=True``: a checkpoint is untrusted input, and a full
    unpickle would run any code a crafted file names. Lightning checkpoints of an ImageClassifier hold only
    tensors, containers and plain values, which the restricted loader admits."""
    import pickle
    import zipfile

    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln.split("error:", 1)[-1].strip().split(". Please")[0] for ln in lines if "Unsupported global" in ln), None)
        if why is not None:  # a well-formed pickle naming a global outside the safe set
            raise _CliError(
                f"checkpoint {path}: refusing to load it, it holds Python objects that torch.load(weights_only=True) "
                f"does not admit ({why}); flatq-ptq never executes code from a checkpoint. If you trust the file, "
                "rebuild the module in your own code from a source you trust and call run_ptq on it"
            ) from None
        detail = next((ln for ln in lines if "WeightsUnpickler error" not in ln and not ln.startswith(("Weights only", "Please file", "Check the"))), type(err).__name__)
        raise _CliError(f"checkpoint {path}: not a readable PyTorch checkpoint (corrupt or truncated? {detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _CliError(
            f"checkpoint {path}: not a readable PyTorch checkpoint (corrupt or truncated? {type(err).__name__}: {msg})"
        ) from None
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise _CliError(f"checkpoint {path}: not a Lightning checkpoint (no 'state_dict' entry)")
    return raw


def _check_save_dir(save_dir: Path) -> None:
    """Fail before any PTQ work if the reports could not be written there."""
    if save_dir.exists() and not save_dir.is_dir():
        raise _CliError(f"--save-dir {save_dir} is a file, not a folder: give a folder for the reports")
    parent = save_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise _CliError(f"--save-dir {save_dir}: {parent} is a file, so the folder cannot be created")
    import os

    if not os.access(parent, os.W_OK):
        raise _CliError(f"--save-dir {save_dir}: {parent} is not writable")


def _model_in_chans(module: Any) -> int | None:
    """The input channels of the network's first convolution (None if it starts with something else)."""
    from torch import nn

    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(m.in_channels)
    return None


def datamodule_from_checkpoint(
    ckpt: dict[str, Any], name: str | None = None, overrides: dict[str, Any] | None = None
) -> Any:
    """Rebuild the data module a checkpoint was trained with (or ``name``), applying ``overrides``.

    The name comes from the data module state Lightning stores under the module's class name; its
    constructor arguments from ``datamodule_hyper_parameters``. ``None`` values in ``overrides`` are ignored.
    """
    from flatq_lightning.app.data import DATAMODULES, build_datamodule

    hparams: dict[str, Any] = dict(ckpt.get("datamodule_hyper_parameters") or {})
    recorded = None
    for cls in DATAMODULES.values():
        state = ckpt.get(cls.__qualname__)
        if isinstance(state, dict) and state.get("name") in DATAMODULES:
            recorded = state["name"]
            break
    if name is None:
        name = recorded
    if name is None:
        raise _CliError(
            f"the checkpoint does not record its data module: pass --data (one of {sorted(DATAMODULES)})"
        )
    if name not in DATAMODULES:
        raise _CliError(f"--data {name!r} is unknown: choose one of {sorted(DATAMODULES)}")
    cls = DATAMODULES[name]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in params and k != "kwargs"} if name == recorded else {}
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "root" in params and "path" in over:
        over["root"] = over.pop("path")
    for k, v in over.items():
        if k not in params:
            flag = "--data-path" if k in ("path", "root") else "--" + k.replace("_", "-")
            raise _CliError(f"{flag} does not apply to the {name!r} data")
        kwargs[k] = v
    if "path_key" in params:
        kwargs["path_key"] = "--data-path"
    return build_datamodule(name, **kwargs)


def _input_description(dm: Any) -> dict[str, Any]:
    """What the exported model takes as input: the data module's normalisation, when it has one."""
    out: dict[str, Any] = {"layout": "NCHW", "dtype": "float32"}
    mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
    if mean is not None and std is not None:
        out.update(pixels="scaled to [0, 1], then (x - mean) / std per channel",
                   mean=[float(m) for m in mean], std=[float(s) for s in std])
    size = getattr(dm, "image_size", None)
    if isinstance(size, int):
        out["image_size"] = size
    return out


def _run(args: argparse.Namespace) -> int:
    import torch

    from flatq_lightning.ptq import runner  # runner.run_ptq: looked up at call time (tests replace it)
    from flatq_lightning.quant.targets import QuantTarget

    ckpt_path = Path(args.checkpoint).expanduser()
    if not ckpt_path.is_file():
        raise _CliError(f"checkpoint not found: {ckpt_path}")
    bits, recipe, formats = _check_args(args)
    save_dir = Path(args.save_dir) if args.save_dir else ckpt_path.parent / f"ptq_{ckpt_path.stem}"
    _check_save_dir(save_dir)
    module, dm = _load(ckpt_path, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = QuantTarget(keep_first_last_8bit=args.keep_first_last_8bit)
    plan = _sensitivity_and_plan(args, module, dm, recipe, target, device, save_dir)
    try:
        report = runner.run_ptq(
            module,
            dm.calib_dataloader(args.batch_size),
            dm.test_dataloader(),
            bits=bits,
            calib_batches=args.calib_batches,
            recipe=recipe,
            target=target,
            device=device,
            plan=plan,
            progress=args.progress,
            bn_loader=dm.train_dataloader(),
            bn_transform=getattr(dm, "augment_batch", None) if getattr(dm, "augment", False) else None,
            export_dir=save_dir if formats else None,
            export_formats=formats,
            overwrite=args.overwrite,
            parity_batches=args.parity_batches,
            export_metadata={"checkpoint": ckpt_path.name, "input": _input_description(dm)},
        )
    except ValueError as err:
        raise _CliError(str(err)) from None
    return _print_report(report, save_dir, ckpt_path, formats, args.overwrite)


def _check_args(args: argparse.Namespace) -> tuple[list[str], Any, tuple[str, ...]]:
    """``(bits, recipe, export formats)`` from the flags, or a one-line error before any work."""
    from flatq_lightning.ptq.export import normalize_export_formats

    bits = [b.strip() for b in str(args.bits).split(",") if b.strip()]
    if not bits:
        raise _CliError(f"--bits is empty: give presets like {_DEFAULT_BITS}")
    recipe = recipe_from_args(args)
    try:
        formats = normalize_export_formats(args.export)
    except ValueError as err:
        raise _CliError(f"--export: {err}") from None
    if args.parity_batches is not None and args.parity_batches < 1:
        raise _CliError(f"--parity-batches must be a positive number, got {args.parity_batches}")
    if "onnx" in formats:
        from flatq_lightning.ptq.onnx_export import require_onnx

        try:
            require_onnx("--export onnx")
        except ImportError as err:
            raise _CliError(str(err)) from None
    return bits, recipe, formats


def _load(ckpt_path: Path, args: argparse.Namespace) -> tuple[Any, Any]:
    """The checkpoint's ImageClassifier (its BN statistics as --bn-stats says) and its data module, set up and
    checked against the network (classes, input channels)."""
    from flatq_lightning.app.data.base import DataNotFoundError
    from flatq_lightning.app.module import ImageClassifier
    from flatq_lightning.callbacks.weight_noise import NOISY_BN_KEY
    from flatq_lightning.quant.bn import load_bn_state

    raw = _load_raw(ckpt_path)
    hp = raw.get("hyper_parameters") or {}
    if "model" not in hp:
        raise _CliError(
            f"{ckpt_path} was trained with an nn.Module passed to ImageClassifier (no model name saved); "
            "load it in Python: ImageClassifier.load_from_checkpoint(path, model=net) and call run_ptq"
        )
    # the checkpoint holds the trained weights: never fetch the starting weights again (offline, or moved)
    over = {"pretrained": False, "pretrained_file": None} if hp.get("pretrained") or hp.get("pretrained_file") else {}
    module = ImageClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, **over)
    overrides: dict[str, Any] = {
        "path": args.data_path,
        "cache_dir": args.cache_dir,
        "eval_batch_size": args.batch_size,
        "num_workers": args.num_workers,
    }
    dm = datamodule_from_checkpoint(raw, args.data, overrides)
    if args.bn_stats == "noisy":
        noisy = raw.get(NOISY_BN_KEY)
        if not noisy:
            raise _CliError(
                f"--bn-stats noisy: the checkpoint has no '{NOISY_BN_KEY}' (it was not trained with DNQ noise, or "
                "with clean_bn_batches=0): its BatchNorm statistics are the only set"
            )
        load_bn_state(module, noisy)
    del raw
    try:
        dm.prepare_data()
        dm.setup("fit")
    except DataNotFoundError as err:
        raise _CliError(str(err)) from None
    if dm.num_classes != module.num_classes:
        raise _CliError(
            f"the data has {dm.num_classes} classes but the checkpoint's classifier has {module.num_classes}: "
            "wrong --data?"
        )
    chans = _model_in_chans(module)
    if chans is not None and getattr(dm, "in_chans", chans) != chans:
        raise _CliError(
            f"--data {args.data or 'from the checkpoint'}: the data has {dm.in_chans}-channel images but the "
            f"checkpoint's network takes {chans} input channels: wrong --data?"
        )
    return module, dm


def _print_report(report: Any, save_dir: Path, ckpt_path: Path, formats: tuple[str, ...], overwrite: bool) -> int:
    """Write the report, print its tables; 1 when an export failed."""
    files = report.write(save_dir, overwrite=overwrite)
    print(f"\n{ckpt_path.name}: FP top-1 {report.fp_top1:.2f} % on {report.num_eval_samples} test images\n")
    print(report.markdown_table())
    failed = [e for r in report.rows for e in r.exports if e.get("error")]
    if formats:
        what = " (top-1 of the flatq model and of ONNX Runtime on the same test images)" if "onnx" in formats else ""
        print(f"\nexported{what}:\n")
        print(report.export_table())
    print(f"\nreport in {save_dir}: {', '.join(f.name for f in files.values())}")
    if failed:
        print(f"flatq-ptq: error: {len(failed)} export(s) failed (see the table above)", file=sys.stderr)
        return 1
    return 0


def _sensitivity_and_plan(args: argparse.Namespace, module: Any, dm: Any, recipe: Any, target: Any, device: str,
                          save_dir: Path) -> Any:
    """``--sensitivity``: the per-layer analysis, written beside the report; ``--budget``: the plan (or None)."""
    if args.budget is None and not args.sensitivity:
        return None
    from flatq_lightning.ptq.mixed_precision import parse_bits_choices, plan_mixed_precision
    from flatq_lightning.ptq.runner import ptq_network
    from flatq_lightning.ptq.sensitivity import analyze_sensitivity, take_images

    for flag, v in (("--plan-images", args.plan_images), ("--sensitivity-images", args.sensitivity_images)):
        if v < 1:
            raise _CliError(f"{flag} must be a positive number, got {v}")
    try:
        choices = parse_bits_choices(args.bits_choices)
    except ValueError as err:
        raise _CliError(f"--bits-choices: {err}") from None
    net = ptq_network(module).to(device).eval()
    held_out = take_images(dm.val_dataloader(), args.plan_images)
    plan = None
    try:
        if args.sensitivity:
            b = args.sensitivity_bits
            rep = analyze_sensitivity(net, take_images(dm.calib_dataloader(args.batch_size), 32 * 128), held_out,
                                      take_images(dm.test_dataloader(), args.sensitivity_images), (b,), (b,),
                                      recipe=recipe, target=target, predict_bits=choices, progress=args.progress)
            files = rep.save(save_dir, overwrite=args.overwrite)
            print(f"\nper-layer sensitivity at {b} bits (predicted in {rep.seconds['predict']:.1f} s, measured in "
                  f"{rep.seconds['measure']:.1f} s on {rep.images} test images):\n")
            print(rep.table())
            print(f"\nsensitivity in {save_dir}: {', '.join(f.name for f in files)}")
        if args.budget is not None:
            plan = plan_mixed_precision(net, held_out, args.budget, choices, recipe, target)
            print(f"\nmixed-precision plan at {args.budget:g} bits per weight:\n")
            print(plan.table())
    except (ValueError, FileExistsError) as err:
        raise _CliError(str(err)) from None
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``flatq-ptq``; returns the exit status (2 on usage or data errors)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except _CliError as err:
        print(f"flatq-ptq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
