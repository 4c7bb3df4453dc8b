"""ONNX export of a quantized model with QuantizeLinear/DequantizeLinear, and its parity check in ONNX Runtime.

:func:`export_onnx` writes the model built by :func:`~flatq_lightning.quant.quantize_model` (BatchNorm folded)
as an ONNX graph a runtime recognises as quantized (the "QDQ" form):

- each quantized layer input: ``QuantizeLinear → DequantizeLinear`` with the per-tensor scale and integer zero
  point of the flatq report (uint8 for 2- to 8-bit activations, uint16 above); below 8 bits a ``Clip`` to the
  layer's ``[(qmin − z)·s, (qmax − z)·s]`` comes first, so the codes stay on the narrower grid;
- each quantized weight: an integer initializer (the flatq codes, bit for bit) and ``DequantizeLinear`` with
  one scale per output channel and zero point 0: **int4** for 2- to 4-bit weights (ONNX opset 21), int8 for
  5- to 8-bit, int16 above (``pack_int4=False`` stores 2- to 4-bit weights as int8, for runtimes without int4);
- everything else as ``torch.onnx`` exports the FP network (the TorchScript exporter, ``dynamo=False``).

The graph is built by tracing the quantized model with two placeholder nodes (``flatq::QuantizeInput``,
``flatq::DequantizeWeight``) that are then replaced, with the ``onnx`` helper API, by the nodes above built
from the quantized model's own scales and integer codes. :func:`check_onnx_parity` runs the same batches
through ONNX Runtime and the flatq model and reports top-1 of both, argmax agreement and the largest logit
difference.

Needs the optional extra ``pip install "flatq_lightning[onnx]"`` (``onnx``, ``onnxruntime``).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import io
import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..quant import QuantizedLayer, QuantSpec, batch_inputs, quantized_layers
from ..quant.quantize import _set_submodule
from ..quant.targets import has_weight
from ..utils.io import write_file_atomic
from .evaluate import _batch_targets, _logits, _model_device, _progress
from .export import pack_codes, weight_codes

__all__ = [
    "ONNX_FORMAT",
    "ONNX_FORMAT_VERSION",
    "OnnxParity",
    "check_onnx_parity",
    "export_onnx",
    "onnx_available",
    "act_container",
    "ort_kernels",
    "ort_session",
    "require_onnx",
    "weight_container",
]

ONNX_FORMAT = "flatq-onnx-qdq"
ONNX_FORMAT_VERSION = 1
#: opset of the traced graph; raised to 21 when int4 or 16-bit integer tensors are needed
DEFAULT_OPSET = 18
_INT_OPSET = 21
_DOMAIN = "flatq"


def onnx_available() -> bool:
    """Whether ``onnx`` and ``onnxruntime`` can be imported (the ``[onnx]`` extra).

    Example:
        >>> isinstance(onnx_available(), bool)
        True
    """
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def require_onnx(what: str = "ONNX export") -> None:
    """``ImportError`` with the install command when ``onnx``/``onnxruntime`` are missing."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{what} needs {' and '.join(missing)}: pip install \"flatq_lightning[onnx]\" "
            "(or pip install onnx onnxruntime)"
        )


# ---------------------------------------------------------------------------------------------------------
# tracing: placeholders where the quantizers go


class _QuantizeInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: str) -> Tensor:  # noqa: ARG004
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, layer: str) -> Any:
        out = g.op(f"{_DOMAIN}::QuantizeInput", x, layer_s=layer)
        out.setType(x.type())
        return out


class _DequantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, layer: str) -> Tensor:  # noqa: ARG004
        return w.clone()

    @staticmethod
    def symbolic(g: Any, w: Any, layer: str) -> Any:
        out = g.op(f"{_DOMAIN}::DequantizeWeight", w, layer_s=layer)
        out.setType(w.type())
        return out


@dataclass
class _LayerExport:
    """What replaces one layer's placeholders: input qparams, integer weight codes (export layout), axis."""

    act_spec: QuantSpec | None = None
    act_scale: Tensor | None = None
    act_zero_point: int = 0
    weight_spec: QuantSpec | None = None
    codes: Tensor | None = None  # signed integer codes, int32, in the layout the graph uses
    weight_scale: Tensor | None = None
    axis: int | None = None  # None: one scale for the tensor


class _OnnxLayer(nn.Module):
    """Stands in for a :class:`QuantizedLayer` while tracing: the same computation, with placeholders.

    Tensors are registered under the original names (``<layer>.weight``, ``<layer>.bias``), so the ONNX
    initializers carry them too. A Linear's quantized weight is kept transposed (``(in, out)``, the layout
    ``MatMul`` takes), so no ``Transpose`` sits between ``DequantizeLinear`` and the product.
    """

    def __init__(self, name: str, layer: QuantizedLayer) -> None:
        super().__init__()
        mod = layer.module
        self.layer_name = name
        object.__setattr__(self, "_mod", mod)  # not registered: only its configuration is used
        self.kind = "point" if not has_weight(mod) else ("linear" if isinstance(mod, nn.Linear) else "conv")
        self.quant_input = layer.act_spec is not None
        self.quant_weight = layer.weight_spec is not None
        if self.kind != "point":
            w = mod.weight.detach().float()
            if self.quant_weight:
                self.register_buffer("weight", w.t().contiguous() if self.kind == "linear" else w.clone())
            else:
                self.weight = nn.Parameter(w.clone(), requires_grad=False)
            b = getattr(mod, "bias", None)
            self.bias = nn.Parameter(b.detach().float().clone(), requires_grad=False) if b is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.quant_input:
            x = _QuantizeInput.apply(x, self.layer_name)
        if self.kind == "point":
            return x
        w = self.weight
        if self.quant_weight:
            w = _DequantizeWeight.apply(w, self.layer_name)
        if self.kind == "conv":
            return self._mod._conv_forward(x, w, self.bias)
        if self.quant_weight:
            y = torch.matmul(x, w)
            return y + self.bias if self.bias is not None else y
        return nn.functional.linear(x, w, self.bias)


def _act_zero_point(layer: QuantizedLayer) -> int:
    spec = layer.act_spec
    return 0 if spec.symmetric else int(round(float(layer.act_zero_point)))


def _export_form(qmodel: nn.Module) -> tuple[nn.Module, dict[str, _LayerExport]]:
    """A CPU float32 copy of ``qmodel`` with :class:`_OnnxLayer` in place of each quantized layer, and what
    replaces the placeholders."""
    form = copy.deepcopy(qmodel).cpu().float().eval()
    layers: dict[str, _LayerExport] = {}
    for name, layer in quantized_layers(form):
        e = _LayerExport()
        if layer.act_spec is not None:
            if not bool(layer.act_calibrated):
                raise ValueError(f"export_onnx: layer {name!r} quantizes its input but was never calibrated")
            e.act_spec = layer.act_spec
            e.act_scale = layer.act_scale.detach().float().reshape(())
            e.act_zero_point = _act_zero_point(layer)
        if layer.weight_spec is not None:
            q, scale = weight_codes(name, layer)
            spec = layer.weight_spec
            q = q.to(torch.int32)
            if isinstance(layer.module, nn.Linear):
                q = q.t().contiguous()
                axis = 1 - (spec.ch_axis % 2)
            else:
                axis = spec.ch_axis % q.dim()
            e.weight_spec, e.codes, e.weight_scale = spec, q, scale.reshape(-1) if spec.per_channel else scale.reshape(())
            e.axis = axis if spec.per_channel else None
        layers[name] = e
        _set_submodule(form, name, _OnnxLayer(name, layer))
    return form, layers


# ---------------------------------------------------------------------------------------------------------
# replacing the placeholders with QDQ nodes


def _onnx_types() -> dict[str, Any]:
    from onnx import TensorProto

    return {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4, "int8": TensorProto.INT8,
            "uint8": TensorProto.UINT8, "int16": TensorProto.INT16, "uint16": TensorProto.UINT16}


def weight_container(spec: QuantSpec, pack_int4: bool = True) -> str:
    """The ONNX integer type holding a weight's codes: int4 (≤ 4 bits, with ``pack_int4``), int8, int16.

    Example:
        >>> [weight_container(QuantSpec.weight(b)) for b in (2, 4, 6, 8, 12)]
        ['int4', 'int4', 'int8', 'int8', 'int16']
        >>> weight_container(QuantSpec.weight(4), pack_int4=False)
        'int8'
    """
    if spec.bits <= 4 and pack_int4:
        return "int4"
    return "int8" if spec.bits <= 8 else "int16"


def act_container(spec: QuantSpec) -> str:
    """The ONNX integer type of an activation's codes: (u)int8 up to 8 bits, (u)int16 above.

    Example:
        >>> act_container(QuantSpec.activation(4)), act_container(QuantSpec.activation(8)), act_container(QuantSpec.activation(10))
        ('uint8', 'uint8', 'uint16')
    """
    width = 8 if spec.bits <= 8 else 16
    return f"{'int' if spec.symmetric else 'uint'}{width}"


def _container_range(name: str) -> tuple[int, int]:
    bits = int(name.removeprefix("u").removeprefix("int"))
    return (0, 2**bits - 1) if name.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _int_tensor(name: str, container: str, values: Tensor, dims: list[int]) -> Any:
    import numpy as np
    from onnx import helper, numpy_helper

    v = values.to(torch.int64).reshape(-1)
    if container in ("int4", "uint4"):
        raw = pack_codes(v & 0xF, 4).numpy().tobytes()  # two's complement nibbles, first element low
        return helper.make_tensor(name, _onnx_types()[container], dims, vals=raw, raw=True)
    arr = v.numpy().astype(getattr(np, container)).reshape(dims)
    return numpy_helper.from_array(arr, name)


def _float_tensor(name: str, values: Tensor) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(values.detach().float().cpu().numpy().copy(), name)


def _materialize(proto: Any, layers: dict[str, _LayerExport], pack_int4: bool) -> tuple[bool, dict[str, Any]]:
    """Replace the placeholders in ``proto`` (in place); returns (needs opset 21, per-layer summary)."""
    from onnx import helper

    graph = proto.graph
    nodes, inits = [], []
    needs_21 = False
    summary: dict[str, Any] = {}
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        layer = attrs["layer"].decode() if isinstance(attrs["layer"], bytes) else str(attrs["layer"])
        e = layers[layer]
        s = summary.setdefault(layer, {})
        if node.op_type == "QuantizeInput":
            spec = e.act_spec
            cont = act_container(spec)
            needs_21 |= cont.endswith("16")
            sname, zname = f"{layer}.input_scale", f"{layer}.input_zero_point"
            inits += [_float_tensor(sname, e.act_scale), _int_tensor(zname, cont, torch.tensor(e.act_zero_point), [])]
            x = node.input[0]
            if (spec.qmin, spec.qmax) != _container_range(cont):
                # a narrower grid than the container: clip to it first, in float (exact: see the module docstring)
                z = float(e.act_zero_point)
                lo = (torch.tensor(spec.qmin - z, dtype=torch.float32) * e.act_scale).reshape(())
                hi = (torch.tensor(spec.qmax - z, dtype=torch.float32) * e.act_scale).reshape(())
                inits += [_float_tensor(f"{layer}.input_clip_min", lo), _float_tensor(f"{layer}.input_clip_max", hi)]
                nodes.append(helper.make_node("Clip", [x, f"{layer}.input_clip_min", f"{layer}.input_clip_max"],
                                              [f"{layer}.input_clipped"], name=f"{layer}/input/Clip"))
                x = f"{layer}.input_clipped"
            nodes.append(helper.make_node("QuantizeLinear", [x, sname, zname], [f"{layer}.input_quantized"],
                                          name=f"{layer}/input/QuantizeLinear"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{layer}.input_quantized", sname, zname],
                                          [node.output[0]], name=f"{layer}/input/DequantizeLinear"))
            s.update(act_bits=spec.bits, act_container=cont, act_clip=x != node.input[0])
        elif node.op_type == "DequantizeWeight":
            spec = e.weight_spec
            cont = weight_container(spec, pack_int4)
            needs_21 |= cont in ("int4", "int16")
            qname, sname, zname = f"{layer}.weight_quantized", f"{layer}.weight_scale", f"{layer}.weight_zero_point"
            zeros = torch.zeros(e.weight_scale.shape, dtype=torch.int64)
            inits += [_int_tensor(qname, cont, e.codes, list(e.codes.shape)), _float_tensor(sname, e.weight_scale),
                      _int_tensor(zname, cont, zeros, list(zeros.shape))]
            kw = {"axis": e.axis} if e.axis is not None else {}
            nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [node.output[0]],
                                          name=f"{layer}/weight/DequantizeLinear", **kw))
            s.update(weight_bits=spec.bits, weight_container=cont, weight_axis=e.axis)
        else:  # pragma: no cover - only the two placeholders exist
            raise ValueError(f"export_onnx: unknown placeholder {node.op_type}")
    # drop nodes nothing reads (the exporter's Identity copies of float weights the placeholders replaced,
    # e.g. of two equal weights), so their float initializers go too
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in read for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]  # the float weights the placeholders took go
    del graph.initializer[:]
    graph.initializer.extend(keep + inits)
    for opset in list(proto.opset_import):
        if opset.domain == _DOMAIN:
            proto.opset_import.remove(opset)
    return needs_21, summary


# ---------------------------------------------------------------------------------------------------------
# export


def _torch_export(form: nn.Module, example: Tensor, opset: int, dynamic_batch: bool, custom: bool) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = dict(
        opset_version=opset, input_names=["input"], output_names=["logits"], do_constant_folding=True,
    )
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    if custom:
        kwargs["custom_opsets"] = {_DOMAIN: 1}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: it runs the placeholders' symbolic functions
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(form, (example,), buf, **kwargs)
    return buf.getvalue()


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor,
    opset: int = DEFAULT_OPSET,
    pack_int4: bool = True,
    metadata: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as ONNX: QDQ form for a quantized model (see the module docstring), plain for an FP one.

    ``model``: the output of ``quantize_model`` (BN folded), or any FP network (no :class:`QuantizedLayer`:
    exported as it is, for comparison). ``example_input``: one input batch (its batch size is not fixed in the
    file unless ``dynamic_batch=False``); the graph's input is ``input``, its first output ``logits``.
    ``opset``: of the traced graph (raised to 21 when int4 or 16-bit integers are stored). ``pack_int4``: store
    2- to 4-bit weights as int4 (else int8, same codes). ``metadata``: yours, JSON-serialisable, stored in the
    model's ``metadata_props`` as ``flatq.user`` (e.g. the input normalisation).

    The file is checked with ``onnx.checker`` (full check) and written atomically; an existing ``path`` is never
    replaced unless ``overwrite=True`` (``FileExistsError``). The model itself is not changed.

    Example:
        >>> from flatq_lightning import fold_batchnorm, quantize_model
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4))
        >>> x = torch.randn(16, 3, 8, 8)
        >>> q = quantize_model(fold_batchnorm(net), "w4a8", calib_batches=[x])
        >>> path = export_onnx(q, "/tmp/q.onnx", x[:1], overwrite=True)           # doctest: +SKIP
        >>> check_onnx_parity(q, path, [(x, torch.zeros(16, dtype=torch.long))]).agreement  # doctest: +SKIP
        100.0
    """
    require_onnx()
    import onnx
    from onnx import helper

    if not isinstance(example_input, Tensor):
        raise TypeError(f"export_onnx: example_input must be a Tensor (one input batch), got {type(example_input).__name__}")
    form, layers = _export_form(model)
    example = example_input.detach().cpu().float()
    raw = _torch_export(form, example, opset, dynamic_batch, custom=bool(layers))
    proto = onnx.load_from_string(raw)
    needs_21, summary = _materialize(proto, layers, pack_int4) if layers else (False, {})
    if needs_21:
        if any(n.op_type == "GroupNormalization" for n in proto.graph.node):
            raise ValueError("export_onnx: the graph has GroupNormalization, whose meaning changed in opset 21: "
                             "export with pack_int4=False and 2- to 8-bit quantizers")
        for o in proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, _INT_OPSET)
        proto.ir_version = max(proto.ir_version, 10)
    props = {"flatq.format": ONNX_FORMAT, "flatq.version": str(ONNX_FORMAT_VERSION),
             "flatq.quantized": "true" if layers else "false", "flatq.layers": json.dumps(summary)}
    if metadata:
        props["flatq.user"] = json.dumps(metadata)
    helper.set_model_props(proto, props)
    proto.producer_name = "flatq_lightning"
    onnx.checker.check_model(proto, full_check=True)
    return write_file_atomic(path, proto.SerializeToString(), overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime


_OPT_LEVELS = ("all", "extended", "basic", "disable")


def ort_session(
    path: str | os.PathLike, threads: int | None = None, optimization: str = "all", qdq_fusion: bool = True
) -> Any:
    """An ONNX Runtime CPU session for ``path`` with ``threads`` intra-op threads (default: torch's thread
    count, so ``OMP_NUM_THREADS``/``torch.set_num_threads`` govern both) and the graph optimisation level
    (``"all"``, ONNX Runtime's default, fuses QDQ groups into integer kernels; ``"disable"`` runs the graph as
    written). ``qdq_fusion=False`` sets ONNX Runtime's ``session.disable_quant_qdq``: no integer kernels, the
    weights are dequantized once when the session is built and the convolutions run in float (with their
    fast blocked layouts), the activations still go through QuantizeLinear/DequantizeLinear."""
    require_onnx("ONNX Runtime")
    import onnxruntime as ort

    if optimization not in _OPT_LEVELS:
        raise ValueError(f"optimization must be one of {_OPT_LEVELS}, got {optimization!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if not qdq_fusion:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


#: ONNX Runtime kernels (op types of its optimised graph) that compute a convolution or a matrix product on
#: integers, and those that do it in float
INTEGER_KERNELS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul", "QGemm", "MatMulNBits")
FLOAT_KERNELS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")


def ort_kernels(path: str | os.PathLike, threads: int = 1) -> dict[str, Any]:
    """What ONNX Runtime runs for the file at ``path`` after its graph optimisation (level ``"all"``, this
    machine's CPU execution provider): ``{"ops": {op_type: count}, "integer": n, "float": n}``, where
    ``integer`` counts the convolutions and matrix products it runs on integer kernels (:data:`INTEGER_KERNELS`)
    and ``float`` those it runs in float (:data:`FLOAT_KERNELS`). The optimised graph is written to a temporary
    file and read back (ONNX Runtime's ``optimized_model_filepath``)."""
    require_onnx("ONNX Runtime")
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        so.log_severity_level = 3  # its warning that the optimised file is machine-specific
        ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"ops": dict(sorted(ops.items())), "integer": sum(ops.get(k, 0) for k in INTEGER_KERNELS),
            "float": sum(ops.get(k, 0) for k in FLOAT_KERNELS)}


@dataclass
class OnnxParity:
    """The same batches through ONNX Runtime and the flatq fake-quant model.

    ``top1_*`` in percent (NaN without targets), ``agreement``: the share of samples whose argmax is the
    same (percent), ``max_abs_logit_diff``/``mean_abs_logit_diff``: over all logits.

    Example:
        >>> p = OnnxParity(100, 91.0, 90.0, 99.0, 0.02, 0.001, "1.20.0", "all")
        >>> p.line()
        'ONNX Runtime 1.20.0 (optimization all) vs flatq on 100 samples: top-1 90.00 % vs 91.00 %, argmax agree 99.00 %, max |Δ logit| 0.0200'
    """

    samples: int
    top1_flatq: float
    top1_ort: float
    agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    ort_version: str
    optimization: str

    def line(self) -> str:
        return (f"ONNX Runtime {self.ort_version} (optimization {self.optimization}) vs flatq on {self.samples} "
                f"samples: top-1 {self.top1_ort:.2f} % vs {self.top1_flatq:.2f} %, argmax agree "
                f"{self.agreement:.2f} %, max |Δ logit| {self.max_abs_logit_diff:.4f}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@torch.no_grad()
def check_onnx_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike | Any,
    batches: Iterable[Any],
    max_batches: int | None = None,
    threads: int | None = None,
    optimization: str = "all",
    progress: bool = False,
) -> OnnxParity:
    """Run ``batches`` (``(inputs, targets)`` or inputs alone) through ``model`` and through ONNX Runtime on
    ``onnx_path`` (a path or an ``InferenceSession``), and compare: top-1 of each, argmax agreement, max and
    mean absolute logit difference. ``max_batches``: only the first so many batches.

    The flatq model runs on its own device in eval mode; ONNX Runtime on the CPU (see :func:`ort_session`).
    """
    sess = onnx_path if hasattr(onnx_path, "run") else ort_session(onnx_path, threads, optimization)
    import onnxruntime as ort

    in_name = sess.get_inputs()[0].name
    was_training = model.training
    model.eval()
    dev = _model_device(model)
    n = agree = right_q = right_o = 0
    max_diff, sum_diff, n_logits = 0.0, 0.0, 0
    has_targets = True
    it = batches if max_batches is None else (b for i, b in enumerate(batches) if i < max_batches)
    try:
        for batch in _progress(it, progress, desc="parity", leave=False):
            x = batch_inputs(batch)
            lq = _logits(model(x.to(dev))).float().cpu()
            lo = torch.from_numpy(sess.run(None, {in_name: x.detach().cpu().float().numpy()})[0]).float()
            if lo.shape != lq.shape:
                raise ValueError(f"ONNX Runtime returned logits of shape {tuple(lo.shape)}, flatq {tuple(lq.shape)}")
            d = (lo - lq).abs()
            max_diff = max(max_diff, float(d.max()))
            sum_diff += float(d.sum())
            n_logits += d.numel()
            pq, po = lq.argmax(1), lo.argmax(1)
            agree += int((pq == po).sum())
            try:
                y = _batch_targets(batch)
                y = y.argmax(1) if y.dim() == 2 else y
                right_q += int((pq == y.cpu()).sum())
                right_o += int((po == y.cpu()).sum())
            except ValueError:
                has_targets = False
            n += int(x.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("check_onnx_parity: the batches were empty")
    nan = float("nan")
    return OnnxParity(
        samples=n,
        top1_flatq=100.0 * right_q / n if has_targets else nan,
        top1_ort=100.0 * right_o / n if has_targets else nan,
        agreement=100.0 * agree / n,
        max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=sum_diff / max(1, n_logits),
        ort_version=ort.__version__,
        optimization=optimization if not hasattr(onnx_path, "run") else "session",
    )
