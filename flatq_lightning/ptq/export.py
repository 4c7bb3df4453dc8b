"""Hand-off format for a quantized model: packed integer weights, scales and zero points in safetensors.

:func:`save_quantized` writes a model built by :func:`~flatq_lightning.quant.quantize_model` (BatchNorm folded)
as one safetensors file that any reader can turn back into float weights without flatq (``docs/export.md``
documents the format and gives a ten-line reader); :func:`load_quantized` rebuilds the same fake-quant model on
the FP architecture, bit for bit. Format version 2:

- keys are the original module names (``layer1.0.conv1.bias``, never the wrapper's ``….module.bias``);
- each quantized weight is ``<layer>.weight_packed`` (uint8): unsigned codes ``u = q − qmin`` packed
  little-end first, four per byte for 2-bit weights, two per byte for 3- and 4-bit, one per byte for 5- to
  8-bit (9- to 16-bit: int32, one per element), with ``<layer>.weight_scale`` (float32, one per output channel)
  and ``<layer>.weight_zero_point`` (int32, ``−qmin``): ``W = (u − zero_point) · scale``;
- each quantized layer input has ``<layer>.input_scale`` (float32) and ``<layer>.input_zero_point`` (int32);
- every other tensor of the folded model under its own name, and JSON metadata (format, version, the folded
  BatchNorm pairs, per-layer specs, shapes and storage widths) in the safetensors header under ``"flatq"``.

Version 1 (one int8 per weight, wrapper names; development versions only) is refused with a message.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..quant import QuantizedLayer, QuantSpec, attach_attention_points, fold_batchnorm, quantized_layers
from ..quant.ops import dequantize_int, quantize_int
from ..quant.placement import attach_placement_points, placement_points
from ..quant.quantize import _set_submodule
from ..utils.io import write_file_atomic

__all__ = [
    "EXPORT_FORMATS",
    "FORMAT",
    "FORMAT_VERSION",
    "load_quantized",
    "normalize_export_formats",
    "pack_codes",
    "read_metadata",
    "save_quantized",
    "storage_bits",
    "unpack_codes",
    "weight_codes",
]

FORMAT = "flatq-quantized"
FORMAT_VERSION = 2
_META_KEY = "flatq"
_ACT_BUFFERS = ("weight_scale", "act_scale", "act_zero_point", "act_calibrated")
#: per quantized layer, the file's own tensors (everything else under the layer is a module tensor)
_LAYER_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")


#: what ``run_ptq(export_dir=...)``, the callback's ``export`` and ``flatq-ptq --export`` can write per bit-width
EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "onnx")


def normalize_export_formats(formats: Any) -> tuple[str, ...]:
    """``"onnx"``, ``"onnx,safetensors"``, a list of names, ``True`` (safetensors) or ``False``/``None``/``""``
    (nothing) as a tuple of :data:`EXPORT_FORMATS`, without duplicates (``ValueError`` for anything else).

    Example:
        >>> normalize_export_formats("onnx, safetensors"), normalize_export_formats(True), normalize_export_formats(False)
        (('onnx', 'safetensors'), ('safetensors',), ())
    """
    if formats is None or formats is False:
        return ()
    if formats is True:
        return ("safetensors",)
    if isinstance(formats, str):
        items: list[Any] | None = formats.split(",")
    elif isinstance(formats, Iterable) and not isinstance(formats, (bytes, dict)):
        items = list(formats)  # lists, tuples, Hydra's ListConfig
    else:
        items = None
    if items is None or not all(isinstance(f, str) for f in items):
        raise ValueError(f"export formats must be a name or a list of names from {EXPORT_FORMATS}, got {formats!r}")
    out: list[str] = []
    for f in (f.strip().lower() for f in items):
        if not f:
            continue
        if f not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {f!r}: choose from {EXPORT_FORMATS}")
        if f not in out:
            out.append(f)
    return tuple(out)


def storage_bits(bits: int) -> int:
    """Bits one weight code takes in the file: 2 (four per byte), 4 (two per byte), 8, or 32 (int32).

    Example:
        >>> [storage_bits(b) for b in (2, 3, 4, 5, 8, 12)]
        [2, 4, 4, 8, 8, 32]
    """
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    if bits <= 8:
        return 8
    return 32


def pack_codes(u: Tensor, width: int) -> Tensor:
    """Pack unsigned codes (each ``< 2**width``) into a flat uint8 tensor, ``8 // width`` codes per byte.

    Element ``i`` of the flattened tensor goes to bits ``(i % k)·width …`` of byte ``i // k`` (``k = 8 // width``):
    the first code of a byte is in its lowest bits. The tail is padded with zero codes. ``width`` is 2, 4 or 8.

    Example:
        >>> pack_codes(torch.tensor([1, 2, 15]), 4)
        tensor([33, 15], dtype=torch.uint8)
        >>> unpack_codes(pack_codes(torch.tensor([3, 0, 1, 2, 3]), 2), 2, 5)
        tensor([3, 0, 1, 2, 3], dtype=torch.uint8)
    """
    if width not in (2, 4, 8):
        raise ValueError(f"pack_codes: width must be 2, 4 or 8, got {width}")
    flat = u.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**width):
        raise ValueError(f"pack_codes: codes must lie in [0, {2**width - 1}] for width {width}")
    k = 8 // width
    pad = (-flat.numel()) % k
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, width, dtype=torch.int32)
    return (flat.reshape(-1, k) << shifts).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, width: int, numel: int) -> Tensor:
    """The first ``numel`` codes of a tensor packed by :func:`pack_codes` (uint8; int32 for ``width`` 32)."""
    if width == 32:
        return packed.reshape(-1)[:numel].to(torch.int32)
    if width not in (2, 4, 8):
        raise ValueError(f"unpack_codes: width must be 2, 4, 8 or 32, got {width}")
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & (2**width - 1)).reshape(-1)[:numel]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_weight_spec(name: str, spec: QuantSpec) -> None:
    if not spec.symmetric:
        raise ValueError(
            f"layer {name!r}: asymmetric weight quantization is not exported (QuantizedLayer keeps no weight zero "
            "point); use a symmetric weight spec (QuantSpec.weight)"
        )


def weight_codes(name: str, layer: QuantizedLayer) -> tuple[Tensor, Tensor]:
    """The signed integer codes ``q`` (float32 holding integers) of a layer's stored weight, and its scale.

    ``ValueError`` if the stored weight is off its grid (modified after ``quantize_model``), since integers
    could not reproduce it.
    """
    ws = layer.weight_spec
    _check_weight_spec(name, ws)
    w = layer.module.weight.detach()
    scale = layer.weight_scale.detach().float()
    q = quantize_int(w, ws, scale)
    if not torch.equal(dequantize_int(q, ws, scale, None, w.dtype), w):
        raise ValueError(
            f"save_quantized: the weight of layer {name!r} is not on its {ws.bits}-bit grid "
            "(was it modified after quantize_model?); cannot store it as integers"
        )
    return q, scale


def save_quantized(
    qmodel: nn.Module,
    path: str | os.PathLike,
    folded_bn_pairs: list[tuple[str, str]] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a quantized model (the output of ``quantize_model``) as safetensors with packed integer weights.

    See the module docstring and ``docs/export.md`` for the format. Pass ``folded_bn_pairs`` (from
    ``fold_batchnorm(model, return_pairs=True)``) when the quantized model was built from a folded copy, so
    :func:`load_quantized` folds the FP architecture the same way. ``metadata``: yours, JSON-serialisable.

    The file is written atomically (a temporary file beside it, then moved into place); an existing ``path``
    is never replaced unless ``overwrite=True`` (``FileExistsError``). Raises ``ValueError`` if the model has
    no quantized layers, a stored weight is off its grid, a weight spec is asymmetric, or a layer's input is to
    be quantized but was never calibrated.

    Example:
        >>> import tempfile
        >>> from flatq_lightning import QuantTarget, fold_batchnorm, quantize_model
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> folded, pairs = fold_batchnorm(net, return_pairs=True)
        >>> q = quantize_model(folded, QuantTarget.preset("w4a4", keep_first_last_8bit=False),
        ...                    calib_batches=[torch.randn(8, 3, 8, 8)])
        >>> path = save_quantized(q, Path(tempfile.mkdtemp()) / "q.safetensors", folded_bn_pairs=pairs)
        >>> r = load_quantized(net, path)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(q(x), r(x))
        True
        >>> from safetensors.torch import load_file
        >>> t = load_file(path)
        >>> t["0.weight_packed"].dtype, t["0.weight_packed"].numel(), t["0.weight_zero_point"][0].item()
        (torch.uint8, 108, 8)
    """
    from safetensors.torch import save_file

    layers = quantized_layers(qmodel)
    if not layers:
        raise ValueError("save_quantized: the model has no QuantizedLayer (pass the output of quantize_model)")
    state = qmodel.state_dict()
    tensors: dict[str, Tensor] = {}
    meta_layers = {name: _store_layer(name, layer, state, tensors) for name, layer in layers}
    for key, t in state.items():
        tensors[key] = t
    for key, t in tensors.items():
        # clone: safetensors refuses tensors that share storage (tied weights are stored twice)
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "folded_bn_pairs": [list(p) for p in folded_bn_pairs] if folded_bn_pairs is not None else None,
        # the model carries the residual/pooling points of the "onnxruntime" placement: load recreates them
        "placement": "onnxruntime" if placement_points(qmodel) else "layer_inputs",
        "layers": meta_layers,
        "user": metadata or {},
    }
    header = {_META_KEY: json.dumps(meta), "format": "pt"}
    return write_file_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header), overwrite=overwrite)


def _store_layer(name: str, layer: QuantizedLayer, state: dict[str, Tensor], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """One quantized layer of :func:`save_quantized`: its packed integer weight, scales and zero points into
    ``tensors``, its float tensors moved from ``state`` to ``tensors`` under the layer's name (the quantizer's
    buffers and the fake-quant weight dropped from ``state``); returns the layer's metadata."""
    ws, as_ = layer.weight_spec, layer.act_spec
    w = getattr(layer.module, "weight", None)  # None for weightless points (attention operands)
    info: dict[str, Any] = {
        "module_type": type(layer.module).__name__,
        "weight_spec": ws.to_dict() if ws is not None else None,
        "act_spec": as_.to_dict() if as_ is not None else None,
        "weight_dtype": _dtype_name(w.dtype) if isinstance(w, Tensor) else None,
    }
    if layer.input_from:
        info["input_from"] = layer.input_from
    if ws is not None:
        q, scale = weight_codes(name, layer)
        width = storage_bits(ws.bits)
        u = (q - ws.qmin).to(torch.int32).cpu()
        tensors[f"{name}.weight_packed"] = u.reshape(-1).contiguous() if width == 32 else pack_codes(u, width)
        tensors[f"{name}.weight_scale"] = scale.cpu().contiguous().clone()
        tensors[f"{name}.weight_zero_point"] = torch.full_like(scale, -ws.qmin, dtype=torch.int32).cpu()
        sqnr = layer.weight_sqnr_db
        info.update(weight_shape=list(w.shape), weight_bits=ws.bits, storage_bits=width,
                    weight_sqnr_db=sqnr if math.isfinite(sqnr) else None)
    if as_ is not None:
        if not bool(layer.act_calibrated):
            raise ValueError(
                f"save_quantized: layer {name!r} quantizes its input but was never calibrated "
                "(quantize_model with calib_batches calibrates it)"
            )
        tensors[f"{name}.input_scale"] = layer.act_scale.detach().float().cpu().reshape(()).clone()
        tensors[f"{name}.input_zero_point"] = layer.act_zero_point.detach().cpu().reshape(()).to(torch.int32)
    for buf in _ACT_BUFFERS:
        state.pop(f"{name}.{buf}", None)
    if ws is not None:
        state.pop(f"{name}.module.weight")
    for key in [k for k in state if k.startswith(f"{name}.module.")]:
        tensors[f"{name}.{key.removeprefix(f'{name}.module.')}"] = state.pop(key)
    return info


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a file written by :func:`save_quantized` (``ValueError`` for other files).

    Example:
        >>> read_metadata("/tmp/q.safetensors")["format"]  # doctest: +SKIP
        'flatq-quantized'
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    if _META_KEY not in header:
        raise ValueError(f"{path}: not a flatq quantized model (no '{_META_KEY}' entry in the safetensors header)")
    try:
        meta = json.loads(header[_META_KEY])
        version = int(meta.get("version", -1))
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: the '{_META_KEY}' metadata is not valid JSON of this format ({err})") from None
    if meta.get("format") == FORMAT and version == 1:
        raise ValueError(
            f"{path}: format version 1 (one int8 per weight) was written only by development versions before "
            f"the first release; this reader handles version {FORMAT_VERSION}: export the model again"
        )
    if meta.get("format") != FORMAT or version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r} "
            f"(this reader handles {FORMAT!r} version {FORMAT_VERSION})"
        )
    if not isinstance(meta.get("layers"), dict):
        raise ValueError(f"{path}: the metadata has no 'layers' table")
    return meta


def _rebuild_structure(model_fp: nn.Module, meta: dict[str, Any], path: Any) -> nn.Module:
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
    if any(info.get("module_type") == "QuantPoint" for info in meta["layers"].values()):
        attach_attention_points(qm)  # the file quantized attention operands: recreate their points
    placement = meta.get("placement", "layer_inputs")
    if placement not in ("layer_inputs", "onnxruntime"):
        raise ValueError(f"{path}: unknown quantizer placement {placement!r} in the metadata")
    attach_placement_points(qm, placement)
    return qm


def _wrap(qm: nn.Module, name: str, info: dict[str, Any], path: Any) -> QuantizedLayer:
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
    if info.get("input_from"):
        layer.input_from = str(info["input_from"])
    sqnr = info.get("weight_sqnr_db")
    layer.weight_sqnr_db = float(sqnr) if sqnr is not None else math.inf
    _set_submodule(qm, name, layer)
    return layer


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
    qm = _rebuild_structure(model_fp, meta, path)
    _fill_v2(qm, meta, tensors, path)
    if device is None:
        device = next((t.device for t in model_fp.parameters()), torch.device("cpu"))
    return qm.to(device).eval()


def _fill_v2(qm: nn.Module, meta: dict[str, Any], tensors: dict[str, Tensor], path: Any) -> None:
    state: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in tensors:
            raise ValueError(f"load_quantized: {path} has no tensor {key!r}")
        return tensors.pop(key)

    names = set(meta["layers"])
    for name, info in meta["layers"].items():
        layer = _wrap(qm, name, info, path)
        ws, as_ = layer.weight_spec, layer.act_spec
        if ws is not None:
            shape = [int(s) for s in info["weight_shape"]]
            width = int(info["storage_bits"])
            packed = take(f"{name}.weight_packed")
            numel = math.prod(shape)
            if numel > packed.numel() * (1 if width == 32 else 8 // width):
                raise ValueError(f"load_quantized: {name}.weight_packed in {path} is too short for shape {shape}")
            u = unpack_codes(packed, width, numel).reshape(shape)
            scale = take(f"{name}.weight_scale").float()
            zp = take(f"{name}.weight_zero_point")
            if not torch.all(zp == -ws.qmin):
                raise ValueError(f"load_quantized: {name}.weight_zero_point in {path} is not {-ws.qmin} (symmetric)")
            q = u.to(torch.float32) + ws.qmin
            state[f"{name}.module.weight"] = dequantize_int(q, ws, scale, None, getattr(torch, info["weight_dtype"]))
            state[f"{name}.weight_scale"] = scale
            layer.weight_scale = torch.empty_like(scale)
        else:
            state[f"{name}.weight_scale"] = layer.weight_scale.clone()
        if as_ is not None:
            state[f"{name}.act_scale"] = take(f"{name}.input_scale").float().reshape(())
            state[f"{name}.act_zero_point"] = take(f"{name}.input_zero_point").float().reshape(())
            state[f"{name}.act_calibrated"] = torch.ones((), dtype=torch.bool)
        else:
            for buf in ("act_scale", "act_zero_point", "act_calibrated"):
                state[f"{name}.{buf}"] = getattr(layer, buf).clone()
    for key in list(tensors):
        prefix, _, leaf = key.rpartition(".")
        if prefix in names and leaf not in _LAYER_KEYS:
            state[f"{prefix}.module.{leaf}"] = tensors.pop(key)
        elif prefix in names:
            raise ValueError(f"load_quantized: unexpected tensor {key!r} in {path}")
    state.update(tensors)
    try:
        qm.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"load_quantized: {path} does not match this architecture: {err}") from err
