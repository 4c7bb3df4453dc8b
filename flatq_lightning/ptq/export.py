"""Hand-off format for a quantized model: integer weights, scales and activation qparams in safetensors.

:func:`save_quantized` writes every :class:`~flatq_lightning.quant.QuantizedLayer` weight as integers
``round(W_q / scale)`` (int8 up to 8 bits, int16 above) with its per-channel scale, each layer's activation
scale and zero point, every other tensor of the model's state dict as is, and JSON metadata (format version,
the per-layer :class:`~flatq_lightning.quant.QuantSpec` s, the folded BatchNorm pairs) in the safetensors
header. :func:`load_quantized` rebuilds the same fake-quant model from the FP architecture; its outputs are
bit-for-bit those of the model that was saved.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..quant import QuantizedLayer, QuantSpec, attach_attention_points, fold_batchnorm, quantized_layers
from ..quant.ops import dequantize_int, quantize_int
from ..quant.quantize import _set_submodule

__all__ = ["FORMAT", "FORMAT_VERSION", "save_quantized", "load_quantized", "read_metadata"]

FORMAT = "flatq-quantized"
FORMAT_VERSION = 1
_META_KEY = "flatq"
_ACT_BUFFERS = ("weight_scale", "act_scale", "act_zero_point", "act_calibrated")


def _int_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.bits <= 8 else torch.int16


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_quantized(
    qmodel: nn.Module,
    path: str | os.PathLike,
    folded_bn_pairs: list[tuple[str, str]] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a quantized model (the output of ``quantize_model``) as safetensors with integer weights.

    Tensors: ``<layer>.weight_int`` (int8; int16 for 9-15 bit weights) and ``<layer>.weight_scale`` for each
    quantized weight, ``<layer>.act_scale`` / ``<layer>.act_zero_point`` / ``<layer>.act_calibrated`` for each
    layer, and every other state-dict tensor under its own name. The header's ``"flatq"`` entry holds JSON:
    format and version, ``folded_bn_pairs`` (``None`` when BatchNorm was not folded), per-layer specs, and
    ``metadata`` (yours, JSON-serialisable).

    Pass ``folded_bn_pairs`` (from ``fold_batchnorm(model, return_pairs=True)``) when the quantized model
    was built from a folded copy, so :func:`load_quantized` folds the FP architecture the same way.

    Raises ``ValueError`` if the model has no quantized layers or a stored weight is off its grid (changed
    after quantization), since the integer form could not reproduce it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from flatq_lightning import QuantSpec, fold_batchnorm, quantize_model
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> folded, pairs = fold_batchnorm(net, return_pairs=True)
        >>> q = quantize_model(folded, *QuantSpec.parse("w4a4"), calib_batches=[torch.randn(8, 3, 8, 8)])
        >>> path = save_quantized(q, "/tmp/q.safetensors", folded_bn_pairs=pairs)
        >>> r = load_quantized(net, path)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(q(x), r(x))
        True
    """
    from safetensors.torch import save_file

    layers = quantized_layers(qmodel)
    if not layers:
        raise ValueError("save_quantized: the model has no QuantizedLayer (pass the output of quantize_model)")
    state = qmodel.state_dict()
    tensors: dict[str, Tensor] = {}
    meta_layers: dict[str, Any] = {}
    for name, layer in layers:
        ws, as_ = layer.weight_spec, layer.act_spec
        w = getattr(layer.module, "weight", None)  # None for weightless points (attention operands)
        if ws is not None:
            w = w.detach()
            scale = layer.weight_scale.detach().float()
            q = quantize_int(w, ws, scale)
            if not torch.equal(dequantize_int(q, ws, scale, None, w.dtype), w):
                raise ValueError(
                    f"save_quantized: the weight of layer {name!r} is not on its {ws.bits}-bit grid "
                    "(was it modified after quantize_model?); cannot store it as integers"
                )
            tensors[f"{name}.weight_int"] = q.to(_int_dtype(ws)).cpu().contiguous()
            state.pop(f"{name}.module.weight")
        sqnr = layer.weight_sqnr_db if ws is not None else None
        meta_layers[name] = {
            "module_type": type(layer.module).__name__,
            "weight_spec": ws.to_dict() if ws is not None else None,
            "act_spec": as_.to_dict() if as_ is not None else None,
            "weight_dtype": _dtype_name(w.dtype) if w is not None else None,
            "weight_sqnr_db": sqnr if sqnr is not None and math.isfinite(sqnr) else None,
        }
    for key, t in state.items():
        # clone: safetensors refuses tensors that share storage (tied weights are stored twice)
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "folded_bn_pairs": [list(p) for p in folded_bn_pairs] if folded_bn_pairs is not None else None,
        "layers": meta_layers,
        "user": metadata or {},
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata={_META_KEY: json.dumps(meta), "format": "pt"})
    return p


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a file written by :func:`save_quantized` (``ValueError`` for other files).

    Example:
        >>> read_metadata("/tmp/q.safetensors")["format"]  # doctest: +SKIP
        'flatq-quantized'
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        header = f.metadata() or {}
    if _META_KEY not in header:
        raise ValueError(f"{path}: not a flatq quantized model (no '{_META_KEY}' entry in the safetensors header)")
    meta = json.loads(header[_META_KEY])
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r} "
            f"(this reader handles {FORMAT!r} up to version {FORMAT_VERSION})"
        )
    return meta


def load_quantized(
    model_fp: nn.Module, path: str | os.PathLike, device: str | torch.device | None = None
) -> nn.Module:
    """Rebuild the fake-quant model saved by :func:`save_quantized` on the FP architecture ``model_fp``.

    ``model_fp`` is not mutated and only provides the structure (its weights may be untrained): BatchNorm is
    folded first when the file says it was, each quantized layer is wrapped in a ``QuantizedLayer`` with the
    stored specs, integer weights are dequantized exactly as ``fake_quantize`` does, and every tensor is loaded
    strictly (a different architecture fails with ``ValueError``). The result is in eval mode on ``device``
    (default: ``model_fp``'s device) and reproduces the saved model's outputs bit for bit.

    Example:
        >>> from flatq_lightning.app.models import create_model
        >>> net = create_model("cifar_resnet20", num_classes=10)     # the FP architecture
        >>> qmodel = load_quantized(net, "runs/ptq/quantized_w4a4.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    tensors = load_file(str(path), device="cpu")
    pairs = meta.get("folded_bn_pairs")
    if pairs is not None:
        qm, done = fold_batchnorm(model_fp, return_pairs=True)
        if [list(p) for p in done] != [list(p) for p in pairs]:
            raise ValueError(
                f"load_quantized: folding this architecture gives BatchNorm pairs {done}, the file was folded "
                f"with {[tuple(p) for p in pairs]}: is it the same architecture?"
            )
    else:
        qm = copy.deepcopy(model_fp).eval()
    if any(info["module_type"] == "QuantPoint" for info in meta["layers"].values()):
        attach_attention_points(qm)  # the file quantized attention operands: recreate their points
    for name, info in meta["layers"].items():
        try:
            mod = qm.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"load_quantized: the architecture has no layer {name!r} stored in {path}") from err
        if type(mod).__name__ != info["module_type"]:
            raise ValueError(
                f"load_quantized: layer {name!r} is a {type(mod).__name__} here but a {info['module_type']} in {path}"
            )
        layer = QuantizedLayer(mod, None, None)  # no specs yet: nothing is quantized here
        layer.weight_spec = QuantSpec.from_dict(info["weight_spec"]) if info["weight_spec"] else None
        layer.act_spec = QuantSpec.from_dict(info["act_spec"]) if info["act_spec"] else None
        sqnr = info.get("weight_sqnr_db")
        layer.weight_sqnr_db = float(sqnr) if sqnr is not None else math.inf
        for buf in _ACT_BUFFERS:  # right shapes first, values come with load_state_dict
            key = f"{name}.{buf}"
            if key in tensors:
                setattr(layer, buf, torch.empty_like(tensors[key]))
        if layer.weight_spec is not None:
            q = tensors.pop(f"{name}.weight_int")
            dtype = getattr(torch, info["weight_dtype"])
            tensors[f"{name}.module.weight"] = dequantize_int(q, layer.weight_spec, tensors[f"{name}.weight_scale"], None, dtype)
        _set_submodule(qm, name, layer)
    try:
        qm.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"load_quantized: {path} does not match this architecture: {err}") from err
    if device is None:
        device = next((t.device for t in model_fp.parameters()), torch.device("cpu"))
    return qm.to(device).eval()
