"""Post-training quantization on a copy of the model: fold BN, quantize weights, calibrate, fake-quantize.

``quantize_model`` never mutates its input; the returned model holds :class:`QuantizedLayer` wrappers whose
weight is ``fake_quantize(W)`` and whose input goes through ``fake_quantize`` with calibrated qparams: the
same functions the training-time callbacks use.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.batches import batch_inputs
from .attention import attach_attention_points, detach_attention_points
from .bn import bn_state, load_bn_state, reestimate_bn
from .observers import RangeObserver, make_observer
from .ops import compute_qparams, fake_quantize, sqnr_db
from .placement import attach_placement_points, check_placement, detach_placement_points, share_quantizers
from .spec import QuantSpec
from .targets import QuantTarget, as_target, has_weight

__all__ = [
    "fold_batchnorm",
    "QuantizedLayer",
    "quantize_model",
    "calibrate",
    "quantized_layers",
    "batch_inputs",
    "reestimate_bn_quantized",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _conv_bn_pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    """Conv→BN pairs from an FX trace (the conv's only user is the BN); None when the model does not trace."""
    try:
        import torch.fx as fx

        class _Tracer(fx.Tracer):
            # a BatchNorm subclass (timm's BatchNormAct2d: BN, then dropout and activation) is one step
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return isinstance(m, _BN) or super().is_leaf_module(m, qualname)

        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception:
        return None
    mods = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), _CONV)
            and len(src.users) == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _conv_bn_pairs_children(model: nn.Module) -> list[tuple[str, str]]:
    """Fallback: within each parent, a conv directly followed (registration order) by a matching BN."""
    pairs = []
    for pname, parent in model.named_modules():
        children = list(parent.named_children())
        for (cn, c), (bn_name, b) in zip(children, children[1:]):
            if isinstance(c, _CONV) and isinstance(b, _BN) and b.num_features == c.out_channels:
                pre = f"{pname}." if pname else ""
                pairs.append((pre + cn, pre + bn_name))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    w = conv.weight
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.float() if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(std)
    shape = [-1] + [1] * (w.dim() - 1)
    conv.weight = nn.Parameter((w.float() * factor.reshape(shape)).to(w.dtype))
    conv.bias = nn.Parameter(((bias - bn.running_mean.float()) * factor + beta).to(w.dtype))


def _folded_replacement(bn: nn.Module) -> nn.Module:
    """What stands where a folded BatchNorm was: ``Identity``, or what a BN subclass applies after the
    normalisation (timm's ``BatchNormAct2d``: its ``drop`` and ``act``, identities in eval mode but the
    activation)."""
    if type(bn) in _BN:
        return nn.Identity()
    after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    after = [m for m in after if not isinstance(m, (nn.Identity, nn.Dropout))]
    if not after:
        return nn.Identity()
    return after[0] if len(after) == 1 else nn.Sequential(*after)


def _foldable(bn: nn.Module) -> bool:
    """A plain BatchNorm, or a subclass whose forward is the BN followed by its ``drop``/``act`` (timm)."""
    if type(bn) in _BN:
        return True
    return type(bn).__name__ in ("BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d") and hasattr(bn, "act")


def fold_batchnorm(model: nn.Module, return_pairs: bool = False) -> Any:
    """A new eval-mode copy of ``model`` with every Conv→BN pair folded into the conv (BN → Identity).

    Pairs come from an FX trace when the model traces, otherwise from parent modules whose children run
    conv then BN. timm's ``BatchNormAct2d`` (BN, dropout, activation in one module) folds too: its activation
    takes its place. BatchNorms not matched are left untouched and reported in one warning.
    With ``return_pairs=True`` returns ``(model, [(conv_name, bn_name), …])``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> folded = fold_batchnorm(net)
        >>> type(folded[1]).__name__
        'Identity'
    """
    folded = copy.deepcopy(model).eval()
    pairs = _conv_bn_pairs_fx(folded)
    if pairs is None:
        pairs = _conv_bn_pairs_children(folded)
    mods = dict(folded.named_modules())
    done = []
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        if not bn.track_running_stats or bn.running_mean is None or bn.num_features != conv.out_channels:
            continue
        if not _foldable(bn):
            continue
        _fold_into(conv, bn)
        _set_submodule(folded, bn_name, _folded_replacement(bn))
        done.append((conv_name, bn_name))
    folded_bns = {b for _, b in done}
    left = [n for n, m in mods.items() if isinstance(m, _BN) and n not in folded_bns]
    if left:
        warnings.warn(
            f"fold_batchnorm: {len(left)} BatchNorm layer(s) not preceded by a conv were left unfolded: "
            + ", ".join(left[:8])
            + (" …" if len(left) > 8 else ""),
            stacklevel=2,
        )
    return (folded, done) if return_pairs else folded


class QuantizedLayer(nn.Module):
    """A Conv/Linear whose weight is stored fake-quantized and whose input is fake-quantized on the fly.

    Buffers: ``weight_scale`` (per output channel), ``act_scale`` and ``act_zero_point`` (per tensor), so the
    state dict carries everything needed to rebuild the integer model. A weightless module (a
    :class:`~flatq_lightning.quant.attention.QuantPoint`) takes ``weight_spec=None``: only its input is
    fake-quantized.

    Example:
        >>> from flatq_lightning.quant.attention import QuantPoint
        >>> QuantizedLayer(QuantPoint(), None, QuantSpec.activation(4))
        QuantizedLayer(
          w-a4
          (module): QuantPoint()
        )
    """

    def __init__(self, module: nn.Module, weight_spec: QuantSpec | None, act_spec: QuantSpec | None) -> None:
        super().__init__()
        if weight_spec is not None and not has_weight(module):
            raise ValueError(
                f"QuantizedLayer: a {type(module).__name__} has no weight to quantize: pass weight_spec=None"
            )
        self.module = module
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.observer: RangeObserver | None = None
        self.register_buffer("weight_scale", torch.ones(()))
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("act_zero_point", torch.zeros(()))
        self.register_buffer("act_calibrated", torch.zeros((), dtype=torch.bool))
        # host-side mirror of ``act_calibrated`` so the forward needs no device→host sync; kept in step by
        # calibrate() and by loading a state dict
        self._calibrated = False
        self.register_load_state_dict_post_hook(_sync_calibrated_flag)
        #: SQNR (dB) of the weight quantization, measured when the layer was built (+inf for float weights)
        self.weight_sqnr_db = float("inf")
        if weight_spec is not None:
            with torch.no_grad():
                w = module.weight.detach()
                scale, zp = compute_qparams(w, weight_spec)
                wq = fake_quantize(w, weight_spec, scale, zp)
                self.weight_sqnr_db = float(sqnr_db(w, wq))
                self.weight_scale = scale
                module.weight.data.copy_(wq)

    #: set by :func:`~flatq_lightning.quant.reconstruct.reconstruct` while it learns this layer's rounding and
    #: input step size (an object with ``forward(layer, x)``); ``None`` otherwise
    reconstruction: Any = None
    #: the placement point that quantizes this layer's input for it (the same tensor, the same spec:
    #: :func:`~flatq_lightning.quant.placement.share_quantizers`); ``act_spec`` is then ``None``
    input_from: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x)
        elif self.reconstruction is not None:
            return self.reconstruction.forward(self, x)
        elif self.act_spec is not None and self._calibrated:
            x = fake_quantize(x, self.act_spec, self.act_scale, self.act_zero_point)
        return self.module(x)

    def extra_repr(self) -> str:
        w = f"w{self.weight_spec.bits}" if self.weight_spec else ("wfp" if has_weight(self.module) else "w-")
        a = f"a{self.act_spec.bits}" if self.act_spec else "afp"
        return f"{w}{a}" + (f", input quantized by {self.input_from}" if self.input_from else "")


def _sync_calibrated_flag(module: nn.Module, incompatible_keys: Any) -> None:
    module._calibrated = bool(module.act_calibrated)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[Any], max_batches: int | None = None, momentum: float | None = None
) -> int:
    """Set the activation qparams of every :class:`QuantizedLayer` in ``model`` from ``batches``.

    One pass with quantized weights and float activations; each layer's observer follows its act spec
    (:func:`~flatq_lightning.quant.make_observer`; ``momentum`` turns it into the EMA the
    :class:`~flatq_lightning.QuantErrorRecorder` keeps during training). Returns the number of batches used.
    """
    layers = [m for _, m in quantized_layers(model) if m.act_spec is not None]
    for m in layers:
        m.observer = make_observer(m.act_spec, momentum)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            model(batch_inputs(batch).to(device))
            n += 1
    finally:
        for m in layers:
            obs, m.observer = m.observer, None
            if obs is not None and obs.lo is not None:
                scale, zp = obs.qparams()
                m.act_scale, m.act_zero_point = scale.to(device), zp.to(device)
                m.act_calibrated = torch.ones((), dtype=torch.bool, device=device)
                m._calibrated = True
        model.train(was_training)
    if n == 0:
        raise ValueError("calibration saw no batches: the calibration data is empty")
    return n


def _check_quantize_args(model: Any, target: Any, what: str) -> QuantTarget:
    """The target as a :class:`QuantTarget` (``ValueError`` naming it), and ``TypeError`` for a model that is
    not a module: before any copy is made."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")
    return as_target(target, f"{what}: target")


def quantize_model(
    model: nn.Module,
    target: QuantTarget | str,
    calib_batches: Iterable[Any] | None = None,
    fold_bn: bool = False,
    max_calib_batches: int | None = None,
    act_momentum: float | None = None,
    bn_reestimate: bool = False,
    bn_batches: Iterable[Any] | None = None,
    max_bn_batches: int | None = None,
    bn_transform: Callable[[Tensor], Tensor] | None = None,
    placement: str = "layer_inputs",
) -> nn.Module:
    """A new eval-mode model whose selected layers run fake-quantized weights and inputs.

    ``target`` (a :class:`~flatq_lightning.quant.targets.QuantTarget` or a preset string like ``"w4a4"``) says
    which layers (``include``/``exclude``), at which widths (the first/last policy, per-layer ``layer_bits``)
    and with which quantizers; a ``None`` side of it stays float (weight-only or activation-only rows).
    Activation qparams come from ``calib_batches`` (required when the target quantizes activations). The input
    model is never mutated. With ``fold_bn`` BatchNorm is folded into the convs first.

    With the target's ``attention_points`` (and activation quantization) every timm ``Attention`` of the copy
    gets quantization points (:func:`~flatq_lightning.quant.attention.attach_attention_points`), so Q, K, V and
    the softmax output are fake-quantized and calibrated like layer inputs (ViT W4A4 in the PTQ literature's
    sense); ``False`` quantizes only the Conv/Linear inputs (and removes points the copy may carry). Points never
    count as the first/last layer.

    With ``bn_reestimate`` the BatchNorm running statistics are first re-estimated for this quantizer
    (:func:`reestimate_bn_quantized`: weights quantized, BN not yet folded, activation quantizers on) on
    ``bn_batches`` (default: the calibration batches; ``bn_transform`` applied to each input, e.g. the
    training augmentation), then BN is folded (when ``fold_bn``) and the activations calibrated as usual.
    ``act_momentum`` makes the activation observers EMAs of the batch ranges (what the recorder keeps during
    training); ``None`` is the observer's plain running range.

    ``placement``: where the activation quantizers go (:mod:`~flatq_lightning.quant.placement`):
    ``"layer_inputs"`` (the inputs of the quantized layers) or ``"onnxruntime"`` (also the residual blocks'
    inputs, branch outputs and outputs and the pooling inputs, each tensor quantized once, so that ONNX Runtime
    runs the exported convolutions and adds on integer kernels). Placement points get the activation spec;
    with a float activation side there are none.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> q = quantize_model(net, "w4a4", calib_batches=[torch.randn(16, 4)])
        >>> q(torch.randn(2, 4)).shape
        torch.Size([2, 2])
    """
    target = _check_quantize_args(model, target, "quantize_model")
    act_spec = target.act
    if not isinstance(bn_reestimate, bool):
        raise ValueError(f"bn_reestimate must be True or False, got {bn_reestimate!r}")
    check_placement(placement, "quantize_model: placement")
    if act_spec is not None and calib_batches is None:
        raise ValueError("quantize_model: activation quantization needs calib_batches")
    if act_spec is not None and placement != "layer_inputs":
        calib_batches = list(calib_batches)  # one batch for share_quantizers, then all for calibration
        if not calib_batches:
            raise ValueError("calibration saw no batches: the calibration data is empty")
    if bn_reestimate:
        calib_batches = list(calib_batches) if calib_batches is not None else None
        model = reestimate_bn_quantized(
            model, target, bn_batches if bn_batches is not None else (calib_batches or []),
            calib_batches=calib_batches, max_batches=max_bn_batches, transform=bn_transform,
            act_momentum=act_momentum, max_calib_batches=max_calib_batches, placement=placement,
        )
    qmodel = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    points = target.attention_points and act_spec is not None  # weight-only rows: points would quantize nothing
    if points:
        attach_attention_points(qmodel)
    else:
        detach_attention_points(qmodel)
    detach_placement_points(qmodel)  # a model trained with points: this call's placement decides
    if act_spec is not None:
        attach_placement_points(qmodel, placement)
    selected = target.select(qmodel, points=act_spec is not None)
    if not selected:
        raise ValueError(
            "quantize_model: the model has no quantizable layers (Conv1d/2d/3d, Linear) matching "
            f"include={list(target.include)!r} exclude={list(target.exclude)!r}"
        )
    specs = target.layer_specs(selected)
    for name, mod in selected:
        ws, as_ = specs[name]
        _set_submodule(qmodel, name, QuantizedLayer(mod, ws if has_weight(mod) else None, as_))
    if act_spec is not None and placement != "layer_inputs":
        device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
        share_quantizers(qmodel, batch_inputs(calib_batches[0])[:2].to(device), quantized_layers(qmodel))
    if act_spec is not None:
        calibrate(qmodel, calib_batches, max_calib_batches, momentum=act_momentum)
    return qmodel.eval()


def reestimate_bn_quantized(
    model: nn.Module,
    target: QuantTarget | str,
    batches: Iterable[Any],
    calib_batches: Iterable[Any] | None = None,
    max_batches: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    act_momentum: float | None = None,
    max_calib_batches: int | None = None,
    placement: str = "layer_inputs",
) -> nn.Module:
    """A copy of ``model`` (float weights, BN unfolded) whose BatchNorm running statistics were re-estimated
    on the *quantized* network: a clean re-estimation first, then weights quantized and activation quantizers
    on (the ``target``'s, calibrated on ``calib_batches``, default ``batches``, under those clean statistics),
    then :func:`~flatq_lightning.quant.bn.reestimate_bn` on ``batches`` again.

    This is AIMET's BN re-estimation: the statistics the quantized network produces, so that folding them
    afterwards gives the quantized network the normalisation it needs. With both sides float (``"w16a16"``) it
    is a clean re-estimation. The input model is not changed.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> re = reestimate_bn_quantized(net, "w4a4", [torch.randn(8, 3, 6, 6)])
        >>> bool(re[1].running_var.ne(net[1].running_var).any()), bool(re[0].weight.equal(net[0].weight))
        (True, True)
    """
    target = _check_quantize_args(model, target, "reestimate_bn_quantized")
    batches = list(batches)
    if not batches:
        raise ValueError("reestimate_bn_quantized: the BN re-estimation batches are empty")
    # the activation quantizers are calibrated under statistics that fit the batches (a clean re-estimation
    # first): calibrated under stale statistics (those gathered under noise), their ranges would clip the
    # re-estimation's own, batch-normalised activations
    q = copy.deepcopy(model)
    reestimate_bn(q, batches, max_batches=max_batches, transform=transform)
    if target.weight is not None or target.act is not None:
        q = quantize_model(
            q, target, calib_batches=calib_batches if calib_batches is not None else batches, fold_bn=False,
            max_calib_batches=max_calib_batches, act_momentum=act_momentum, placement=placement,
        )
    reestimate_bn(q, batches, max_batches=max_batches, transform=transform)
    out = copy.deepcopy(model)
    load_bn_state(out, bn_state(q))
    return out
