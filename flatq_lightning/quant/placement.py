"""Where activation quantizers go: at the inputs of the weighted layers, or where a runtime needs them.

A :data:`Placement` names the policy:

- ``"layer_inputs"`` (the default): the input of every quantized Conv/Linear (and the attention operands of
  :mod:`~flatq_lightning.quant.attention`). What the method and the PTQ literature simulate; the residual
  ``Add`` of a ResNet block, the pooling and the tensors between them stay in float.
- ``"onnxruntime"``: also every tensor ONNX Runtime needs quantized to run a residual network on integer
  kernels. Its QDQ fusions turn ``DequantizeLinear → Conv → [Relu] → QuantizeLinear`` into one integer
  convolution and ``DequantizeLinear ×2 → Add → [Relu] → QuantizeLinear`` into an integer add: a convolution
  whose output goes straight into the residual ``Add`` has no quantizer after it under ``"layer_inputs"``, so
  it runs in float. This placement adds :class:`~flatq_lightning.quant.attention.QuantPoint` s (weightless,
  stateless input-only quantization points, the same kind as the attention operands):

  - ``<block>.quant_in``: the input of every residual block (ResNet ``BasicBlock``/``Bottleneck`` of timm,
    torchvision and flatq's CIFAR models; MobileNet/EfficientNet ``InvertedResidual`` and
    ``DepthwiseSeparableConv`` with a skip; torchvision's ``InvertedResidual``), so the identity shortcut and
    the first convolution read the same quantized tensor;
  - ``<block>.<last norm>.quant_out``: the main branch's output, where it enters the ``Add`` (``bn2``/``bn3``,
    folded or not, or ``se`` when the block has one);
  - ``<shortcut>.quant_out``: the output of a projection shortcut (``downsample``/``shortcut``; on a
    ``Sequential``, its last module);
  - ``<block>.quant_out``: the block's output (after the ``Add`` and its activation);
  - ``<pool>.quant_in``: the input of every pooling module (``MaxPool``, ``AvgPool``, adaptive pools), so the
    convolution before it and the pooling itself run on integers.

  A quantizer that would quantize a tensor another one has already quantized, with the same spec, is
  *shared*: :func:`share_quantizers` finds them with one forward on an example batch (tensor identity, no
  tracing) and turns them off (``QuantizedLayer.input_from`` names the quantizer that does the work), so each
  tensor is quantized once and the exported graph has one ``QuantizeLinear``/``DequantizeLinear`` pair per
  quantized tensor.

The points are attached with forward hooks (module-level functions: ``deepcopy`` and pickling keep working)
and hold no state, so ``state_dict`` keys do not change; :func:`detach_placement_points` removes them. ViT
blocks get no extra points: ONNX Runtime runs ``LayerNorm`` and the residual stream in float and already turns
a quantized ``MatMul`` into an integer GEMM with the layer-input placement.

Example:
    >>> from flatq_lightning.app.models.cifar_resnet import BasicBlock
    >>> block = BasicBlock(8, 16, stride=2)
    >>> attach_placement_points(block, "onnxruntime")
    ['quant_in', 'quant_out', 'bn2.quant_out', 'shortcut.1.quant_out']
    >>> x = torch.randn(2, 8, 8, 8)
    >>> bool(torch.equal(block(x), BasicBlock.forward(block, x)))   # points are identities until quantized
    True
    >>> detach_placement_points(block)
    ['quant_in', 'quant_out', 'bn2.quant_out', 'shortcut.1.quant_out']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .attention import QuantPoint

__all__ = [
    "PLACEMENTS",
    "attach_placement_points",
    "check_placement",
    "detach_placement_points",
    "placement_points",
    "residual_blocks",
    "share_quantizers",
    "SharedInputProbe",
]

#: the placement policies (see the module docstring)
PLACEMENTS: tuple[str, ...] = ("layer_inputs", "onnxruntime")

_IN, _OUT = "quant_in", "quant_out"
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def check_placement(placement: Any, where: str = "placement") -> str:
    """``placement`` itself when it is one of :data:`PLACEMENTS`, else ``ValueError`` naming them.

    Example:
        >>> check_placement("onnxruntime")
        'onnxruntime'
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"{where} must be one of {PLACEMENTS}, got {placement!r}")
    return placement


# ---------------------------------------------------------------------------------------------------------
# hooks: module-level functions that look the point up on the module they are registered on


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    point = module._modules.get(_IN)
    if point is None or not args or not isinstance(args[0], Tensor):
        return None
    return (point(args[0]), *args[1:])


def _quantize_output(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:  # noqa: ARG001
    point = module._modules.get(_OUT)
    if point is None or not isinstance(out, Tensor):
        return None
    return point(out)


def _hooked(module: nn.Module, hook: Any, pre: bool) -> bool:
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    return any(h is hook for h in hooks.values())


def _add_point(module: nn.Module, output: bool) -> bool:
    """Register ``quant_out`` (``output``) or ``quant_in`` on ``module`` with its hook; False if present."""
    name = _OUT if output else _IN
    if name in module._modules:
        return False
    if hasattr(module, name):
        raise ValueError(f"placement: a {type(module).__name__} already has an attribute {name!r}")
    module.add_module(name, QuantPoint())
    if output:
        if not _hooked(module, _quantize_output, pre=False):
            module.register_forward_hook(_quantize_output)
    elif not _hooked(module, _quantize_input, pre=True):
        # first, so that other pre-hooks (statistics, noise) see the tensor the block computes with
        module.register_forward_pre_hook(_quantize_input, prepend=True)
    return True


def _last(module: nn.Module) -> nn.Module:
    """The module whose output is ``module``'s output: a Sequential's last child (recursively)."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[len(module) - 1]
    return module


# ---------------------------------------------------------------------------------------------------------
# residual blocks: where the Add's operands come from


def _residual_sites(block: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
    """``(main branch end, projection shortcut or None)`` of a residual block, or None for another module."""
    cls = type(block).__name__
    get = block._modules.get
    if cls in ("BasicBlock", "Bottleneck") and "conv1" in block._modules:
        norm = "bn3" if "conv3" in block._modules else "bn2"
        end = getattr(block, "se", None) or get(norm)
        if end is None:
            return None
        short = get("downsample") if "downsample" in block._modules else get("shortcut")
        if short is None or isinstance(short, nn.Identity) or (isinstance(short, nn.Sequential) and len(short) == 0):
            short = None
        return end, short
    if cls == "InvertedResidual" and "conv" in block._modules and hasattr(block, "use_res_connect"):
        return (get("conv"), None) if block.use_res_connect else None  # torchvision
    if cls in ("InvertedResidual", "DepthwiseSeparableConv") and getattr(block, "has_skip", False):
        end = get("bn3") if cls == "InvertedResidual" else get("bn2")  # timm
        return (end, None) if end is not None else None
    return None


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks the ``"onnxruntime"`` placement equips (registration order).

    Example:
        >>> from flatq_lightning.app.models.cifar_resnet import cifar_resnet20
        >>> residual_blocks(cifar_resnet20())[:4]
        ['layer1.0', 'layer1.1', 'layer1.2', 'layer2.0']
    """
    return [n for n, m in model.named_modules() if _residual_sites(m) is not None]


def attach_placement_points(model: nn.Module, placement: str = "onnxruntime") -> list[str]:
    """Add the quantization points ``placement`` needs to ``model`` (in place); returns their names.

    ``"layer_inputs"`` adds nothing. Idempotent: points already there are kept (and not returned).
    """
    check_placement(placement)
    if placement == "layer_inputs":
        return []
    names = {id(m): n for n, m in model.named_modules()}
    created: list[str] = []

    def add(mod: nn.Module, output: bool) -> None:
        if _add_point(mod, output):
            base = names[id(mod)]
            created.append(f"{base}.{_OUT if output else _IN}" if base else (_OUT if output else _IN))

    for _, mod in list(model.named_modules()):
        sites = _residual_sites(mod)
        if sites is not None:
            end, short = sites
            add(mod, output=False)
            add(_last(end), output=True)
            if short is not None:
                add(_last(short), output=True)
            add(mod, output=True)
        elif isinstance(mod, _POOLS):
            add(mod, output=False)
    new = set(created)
    return [n for n in placement_points(model) if n in new]  # registration order


def detach_placement_points(model: nn.Module) -> list[str]:
    """Remove every placement point and its hook from ``model``; returns the removed points' names."""
    removed: list[str] = []
    for name, mod in list(model.named_modules()):
        for key, hooks, hook in ((_IN, mod._forward_pre_hooks, _quantize_input),
                                 (_OUT, mod._forward_hooks, _quantize_output)):
            ids = [k for k, h in hooks.items() if h is hook]
            if not ids:
                continue
            for k in ids:
                del hooks[k]
            if mod._modules.pop(key, None) is not None:
                removed.append(f"{name}.{key}" if name else key)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(removed, key=lambda n: order.get(n.rpartition(".")[0], -1))


def placement_points(model: nn.Module) -> list[str]:
    """Names of the placement points ``model`` carries (registration order)."""
    out = []
    for name, mod in model.named_modules():
        for key, hooks, hook in ((_IN, mod._forward_pre_hooks, _quantize_input),
                                 (_OUT, mod._forward_hooks, _quantize_output)):
            if key in mod._modules and any(h is hook for h in hooks.values()):
                out.append(f"{name}.{key}" if name else key)
    return out


# ---------------------------------------------------------------------------------------------------------
# one quantizer per tensor


class SharedInputProbe:
    """Watches forwards and finds the layers whose input is the very tensor a quantization point produced (the
    same object, not changed in place since: its ``_version`` is the one the point returned), with an equal
    activation spec: those tensors must be quantized once, by the point.

    ``layers``: ``{name: module}``; ``points``: the names among them that are points; ``spec(name)``: a layer's
    activation spec (``None``: its input is not quantized, so it takes no part). Used as a context manager around
    the forwards to watch; :attr:`shared` is ``{layer: point}``. :func:`share_quantizers` runs it at PTQ, the
    :class:`~flatq_lightning.QuantErrorRecorder` on the first training batch of a fit.
    """

    def __init__(self, layers: dict[str, nn.Module], points: Sequence[str], spec: Any) -> None:
        self.layers, self.points, self.spec = layers, set(points), spec
        self.shared: dict[str, str] = {}
        # id(tensor) -> (the first point that produced it, its version then, the tensor: kept alive so that ids
        # stay unique while watching)
        self._seen: dict[int, tuple[str, int, Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> SharedInputProbe:
        for name, mod in self.layers.items():
            if self.spec(name) is None:
                continue
            self._handles.append(mod.register_forward_pre_hook(self._input_hook(name), prepend=True))
            if name in self.points:
                self._handles.append(mod.register_forward_hook(self._output_hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._seen = [], {}

    def _input_hook(self, name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            src = self._seen.get(id(x)) if isinstance(x, Tensor) else None
            if src is not None and src[0] != name and src[1] == x._version and self.spec(src[0]) == self.spec(name):
                self.shared.setdefault(name, src[0])
        return hook

    def _output_hook(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and id(out) not in self._seen:
                self._seen[id(out)] = (name, out._version, out)
        return hook


@torch.no_grad()
def share_quantizers(model: nn.Module, example: Tensor, layers: Sequence[tuple[str, nn.Module]]) -> dict[str, str]:
    """Turn off input quantizers that would quantize a tensor a placement point of the same spec quantizes.

    ``layers``: the model's ``(name, QuantizedLayer)`` pairs, none calibrated yet (so a point returns its input
    object unchanged and tensor identity follows the data). One forward on ``example`` under a
    :class:`SharedInputProbe`; each shared layer gets ``act_spec = None`` and ``input_from`` = the point's name.
    Returns ``{layer: point}``.
    """
    by_name = dict(layers)
    points = [n for n, m in layers if m.weight_spec is None and not _has_weight(m)]
    was_training = model.training
    model.eval()
    try:
        with SharedInputProbe(by_name, points, lambda n: by_name[n].act_spec) as probe:
            model(example)
    finally:
        model.train(was_training)
    for name, src in probe.shared.items():
        by_name[name].act_spec = None
        by_name[name].input_from = src
    return probe.shared


def _has_weight(layer: nn.Module) -> bool:
    return isinstance(getattr(getattr(layer, "module", None), "weight", None), Tensor)
