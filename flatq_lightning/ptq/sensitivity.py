"""Which layer costs the accuracy: per-layer quantization sensitivity, predicted and measured.

**Predicted** (no quantized evaluation): the change of the loss when a layer's tensor ``t`` is replaced by its
quantized value ``t + e`` (``e = Q(t) − t``, the recipe's quantizer at ``b`` bits, known exactly for PTQ's
deterministic quantizer), to second order:

    ΔL ≈ gᵀe + ½·eᵀHe,

``g`` and ``H`` the gradient and Hessian of the loss w.r.t. ``t``. The second term is the method's model of
quantization error, ½·Tr(H·Σ) + ½·μᵀHμ with ``Σ + μμᵀ = eeᵀ``; it is the whole prediction when the network
sits at a minimum of the loss on the data (``g = 0``). On held-out data a network is not at a minimum and the
first-order term matters (docs/results.md measures both; ``order=2`` is the theory's term alone, ``order=12``
both). Both are reported: ``predicted`` (the chosen order) and ``second_order``.

- **weights**: ``g`` from one backward pass; ``eₗᵀHₗₗeₗ`` for every layer at once with one Hessian-vector
  product per probe and width (:func:`layer_quadratic_forms`: random signs per layer, so the cross-layer terms
  average out while the within-layer ones are kept).
- **activations** (the layer's input): ``g`` per image from one backward pass, ``H`` approximated by the Fisher
  (``gₙgₙᵀ``), so ``½·eᵀHe ≈ ½·mean_n (gₙ·eₙ)²``; ``eₙ`` from the recipe's activation quantizer calibrated at
  ``b`` bits on the same images.

The prediction's images should be labelled images the network was *not* trained on (a held-out split): on its
own training images the gradient says little about held-out accuracy.

**Measured** (what it costs): on held-out labelled images, the top-1 and loss when only that layer's side is
quantized (the rest float: ``top1_drop = FP − it``), and when every layer's side but that one is quantized
(``top1_gain = it − all quantized``); weights and activations separately. The quantized copies come from
:func:`~flatq_lightning.quant.quantize_model` with the recipe's observers, so the numbers mean what the PTQ rows
mean: the "only" settings use the clean BatchNorm statistics, the "all but" settings the recipe's BN handling
(re-estimated on the quantized network when the recipe says so). Every layer is analysed at the analysed width,
first and last included (a mixed-precision plan chooses their width too). Cost: one evaluation per layer, side,
width and setting; a ``target`` with ``include``/``exclude`` and a small image subset bound it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> data = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(2)]
    >>> rep = analyze_sensitivity(net, data, data, data, weight_bits=(3,), act_bits=(3,))
    >>> sorted({(r.side, r.bits) for r in rep.rows}), sorted(rep.spearman)
    ([('act', 3), ('weight', 3)], ['act3', 'weight3'])
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from ..quant import (
    QuantSpec,
    QuantTarget,
    fold_batchnorm,
    make_observer,
    quant_error,
    quantize_model,
    quantized_layers,
    reestimate_bn_quantized,
)
from ..quant.targets import has_weight
from ..utils.batches import batch_inputs
from ..utils.progress import progress as bar
from .evaluate import _batch_targets, _logits, top1_and_loss
from .recipe import PTQRecipe, resolve_recipe
from .sensitivity_report import SIDES, LayerSensitivity, SensitivityReport, spearman

__all__ = [
    "SIDES",
    "LayerSensitivity",
    "SensitivityReport",
    "analyze_sensitivity",
    "layer_quadratic_forms",
    "measure_sensitivity",
    "predict_sensitivity",
    "recorder_error_stats",
    "spearman",
    "take_images",
]

#: ``order`` of the prediction: the theory's second-order term alone, or first and second order
ORDERS = (2, 12)


def _check_bits(name: str, bits: Iterable[int]) -> tuple[int, ...]:
    out = tuple(bits)
    for b in out:
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise ValueError(f"{name}: bit-widths must be ints in [2, 8], got {b!r}")
    return tuple(sorted(set(out)))


def _labelled(batches: Iterable[Any], what: str) -> list[tuple[Tensor, Tensor]]:
    out = []
    for b in batches:
        y = _batch_targets(b)
        out.append((batch_inputs(b), y.argmax(1) if y.dim() == 2 else y))
    if not out:
        raise ValueError(f"{what}: the data yielded no batches")
    return out


def take_images(loader: Iterable[Any], n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``n`` labelled images of ``loader`` as ``(inputs, targets)`` batches: a seeded random subset of a
    ``DataLoader``'s (map-style) dataset, in the loader's batch size, since an evaluation split is often ordered by
    class (an ImageFolder: its first 2,000 CIFAR test images are two classes); otherwise the first ``n``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.arange(100.0).unsqueeze(1), torch.arange(100) // 10)  # ordered by class
        >>> got = take_images(DataLoader(ds, batch_size=16), 40)
        >>> sum(len(y) for _, y in got), len(torch.cat([y for _, y in got]).unique()) > 4
        (40, True)
        >>> [tuple(x.shape) for x, _ in take_images([(torch.zeros(4, 2), torch.zeros(4))] * 3, 6)]
        [(4, 2), (2, 2)]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of images must be a positive int, got {n!r}")
    ds = getattr(loader, "dataset", None)
    if isinstance(loader, DataLoader) and isinstance(ds, Sized) and not isinstance(ds, IterableDataset):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
        loader = DataLoader(Subset(ds, idx), batch_size=loader.batch_size or 128, shuffle=False,
                            collate_fn=loader.collate_fn)
    out, seen = [], 0
    for batch in loader:
        if seen >= n:
            break
        x, y = batch_inputs(batch), _batch_targets(batch)
        out.append((x[: n - seen], y[: n - seen]))
        seen += len(out[-1][1])
    return out


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _recipe(recipe: PTQRecipe | str | None) -> PTQRecipe:
    return recipe if isinstance(recipe, PTQRecipe) else resolve_recipe(recipe)


def _scope(target: QuantTarget | None) -> QuantTarget:
    if target is None:
        return QuantTarget()
    if not isinstance(target, QuantTarget):
        raise ValueError(f"target must be a QuantTarget (its include/exclude pick the layers) or None, got {target!r}")
    return target


def _analysed_layers(model: nn.Module, target: QuantTarget) -> list[tuple[str, nn.Module]]:
    sel = [(n, m) for n, m in target.select(model, points=False) if has_weight(m)]
    if not sel:
        raise ValueError(f"no quantizable layer (Conv/Linear) matches include={target.include!r} "
                         f"exclude={target.exclude!r}")
    return sel


# ---------------------------------------------------------------------------------------------------- prediction


def layer_quadratic_forms(
    model: nn.Module,
    params: Sequence[Tensor],
    directions: Mapping[Any, Sequence[Tensor]],
    batches: Sequence[tuple[Tensor, Tensor]],
    probes: int = 1,
    seed: int = 0,
) -> tuple[dict[Any, list[float]], dict[Any, list[float]]]:
    """``(quadratic, linear)``: ``eₗᵀ·Hₗₗ·eₗ`` and ``gₗᵀeₗ`` for every parameter ``l`` and every set of
    directions (``{key: [e per param]}``), ``g``/``H`` the gradient/Hessian of the mean cross-entropy, averaged
    over ``batches``; every layer in one Hessian-vector product per probe, key and batch.

    Each probe draws a Rademacher sign ``sₗ`` per layer and computes ``H·v`` for ``v = Σₗ sₗ·eₗ``; then
    ``sₗ·eₗᵀ(Hv)ₗ = eₗᵀHₗₗeₗ + Σₘ≠ₗ sₗsₘ·eₗᵀHₗₘeₘ``, whose second term has mean zero: an unbiased estimate of
    every layer's own quadratic form, with the within-layer cross terms of ``H`` that a diagonal estimate drops.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> e = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.2, -0.1]])
        >>> quad, lin_ = layer_quadratic_forms(lin, [lin.weight], {"e": [e]}, [(x, y)])
        >>> quad["e"][0] > 0  # cross-entropy of a linear model is convex
        True
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    gen = torch.Generator().manual_seed(seed)
    quad = {k: torch.zeros(len(params), dtype=torch.float64) for k in directions}
    lin = {k: torch.zeros(len(params), dtype=torch.float64) for k in directions}
    device = _device(model)
    steps = len(directions) * probes
    with torch.enable_grad():
        for x, y in batches:
            loss = nn.functional.cross_entropy(_logits(model(x.to(device))), y.to(device))
            grads = torch.autograd.grad(loss, list(params), create_graph=True)
            k = 0
            for key, es in directions.items():
                lin[key] += torch.stack([(g.detach() * e).sum().double() for g, e in zip(grads, es)]).cpu()
                for _ in range(probes):
                    k += 1
                    signs = (torch.randint(0, 2, (len(params),), generator=gen) * 2 - 1).tolist()
                    hv = torch.autograd.grad(grads, list(params), grad_outputs=[s * e for s, e in zip(signs, es)],
                                             retain_graph=k < steps)
                    quad[key] += torch.stack([s * (e * h).sum().double() for s, e, h in zip(signs, es, hv)]).cpu()
    n = len(batches)
    return ({k: (v / (n * probes)).tolist() for k, v in quad.items()},
            {k: (v / n).tolist() for k, v in lin.items()})


def _mean_gradients(model: nn.Module, params: Sequence[Tensor], data: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """The gradient of the mean cross-entropy over all of ``data`` w.r.t. ``params``."""
    acc = [torch.zeros_like(p) for p in params]
    device, n = _device(model), 0
    with torch.enable_grad():
        for x, y in data:
            loss = nn.functional.cross_entropy(_logits(model(x.to(device))), y.to(device), reduction="sum")
            for a, g in zip(acc, torch.autograd.grad(loss, list(params))):
                a.add_(g)
            n += int(y.shape[0])
    return [a / n for a in acc]


def _weight_error(w: Tensor, bits: int, observer: str) -> Tensor:
    return quant_error(w, QuantSpec.weight(bits, observer=observer))  # the quantizer PTQ applies, Q(w) - w


def _act_quantizers(folded: nn.Module, layers: Sequence[tuple[str, nn.Module]], bits: Sequence[int],
                    batches: Sequence[tuple[Tensor, Tensor]], observer: str) -> dict[tuple[str, int], Any]:
    """Each layer's input quantizer at each width, calibrated on ``batches`` with float weights."""
    obs = {(n, b): make_observer(QuantSpec.activation(b, observer=observer)) for n, _ in layers for b in bits}

    def see(name: str, x: Tensor) -> None:
        for b in bits:
            obs[(name, b)].update(x.detach())

    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: see(name, args[0])) for n, m in layers]
    device = _device(folded)
    try:
        with torch.no_grad():
            for x, _ in batches:
                folded(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {k: (QuantSpec.activation(k[1], observer=observer), *o.qparams()) for k, o in obs.items()}


def predict_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    weight_bits: Iterable[int] = (2, 3, 4, 8),
    act_bits: Iterable[int] = (2, 3, 4, 8),
    recipe: PTQRecipe | str | None = "practical",
    target: QuantTarget | None = None,
    order: int = 12,
    probes: int = 1,
    hessian_batches: int | None = 2,
    seed: int = 0,
    error_stats: Mapping[str, Any] | None = None,
) -> dict[tuple[str, str, int], tuple[float, float]]:
    """Predicted loss change ``{(layer, side, bits): (predicted, second_order)}`` on labelled ``batches``
    (held-out images; see the module docstring). ``order``: 12 (first and second order, the default) or 2
    (the theory's ½·eᵀHe alone). The weight Hessian uses the first ``hessian_batches`` batches (None: all).

    ``error_stats``: the weight-error statistics a DNQ fit recorded (:func:`recorder_error_stats` of the
    recorder's checkpoint state): for their width, a layer they cover takes ``μ`` and ``Σ`` from them instead of
    from the quantizer, ``½·E[e'ᵀHe']`` with ``e' = μ + σ·z`` (per output channel, ``z`` standard normal) and
    ``gᵀμ``: ½·Tr(HΣ) + ½·μᵀHμ + gᵀμ, the theory's prediction from the training-time statistics.

    The model is BN-folded (clean statistics) and not changed; ``recipe`` gives the observers (its BN handling
    and reconstruction do not enter the prediction); ``target``'s include/exclude pick the layers.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (2: the second-order term alone, 12: both), got {order!r}")
    rec, scope = _recipe(recipe), _scope(target)
    wbits, abits = _check_bits("weight_bits", weight_bits), _check_bits("act_bits", act_bits)
    data = _labelled(batches, "predict_sensitivity")
    folded = fold_batchnorm(model).eval()
    for p in folded.parameters():
        p.requires_grad_(True)
    sel = _analysed_layers(folded, scope)
    out: dict[tuple[str, str, int], tuple[float, float]] = {}
    if wbits:
        with torch.no_grad():
            errors = {b: [_weight_error(m.weight.detach(), b, rec.observer) for _, m in sel] for b in wbits}
            means = {b: list(es) for b, es in errors.items()}  # the first-order term's direction: the error's mean
            _use_recorded(error_stats, sel, errors, means, seed)
        hb = data if hessian_batches is None else data[:hessian_batches]
        params = [m.weight for _, m in sel]
        quad, _ = layer_quadratic_forms(folded, params, errors, hb, probes=probes, seed=seed)
        grads = _mean_gradients(folded, params, data)  # the first-order term on every prediction image
        lin = {b: [float((g * e).sum()) for g, e in zip(grads, means[b])] for b in wbits}
        for b in wbits:
            for (name, _), q, g in zip(sel, quad[b], lin[b]):
                out[(name, "weight", b)] = (0.5 * q + (g if order == 12 else 0.0), 0.5 * q)
    if abits:
        out.update(_predict_act(folded, sel, abits, data, rec.act_obs, order))
    return out


def recorder_error_stats(state: Mapping[str, Any]) -> dict[str, Any]:
    """``{"bits": b, "layers": {name: (mean, var)}}`` from a :class:`~flatq_lightning.QuantErrorRecorder`'s state
    (``recorder.state_dict()``, or the DNQ entry of a checkpoint's callback states): the per-channel EMA of the
    weight error's mean and variance it kept during training, at its target's weight width."""
    try:
        bits = int(state["specs"][0]["bits"])
        layers = {str(n): (state["weight_mean"][n], state["weight_var"][n]) for n in state["weight_mean"]}
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"not a QuantErrorRecorder state (weight_mean, weight_var, specs): {err!r}") from None
    return {"bits": bits, "layers": layers}


def _use_recorded(stats: Mapping[str, Any] | None, sel: Sequence[tuple[str, nn.Module]], errors: dict[int, list[Tensor]],
                  means: dict[int, list[Tensor]], seed: int) -> None:
    """Replace, at the recorded width, the exact error of every layer the statistics cover by a draw
    ``μ + σ·z`` (second order) and ``μ`` (first order); names match exactly or by a dotted end (``model.conv1``
    covers the network's ``conv1``)."""
    if not stats:
        return
    b = int(stats["bits"])
    if b not in errors:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    rec = stats["layers"]
    for i, (name, m) in enumerate(sel):
        key = next((k for k in rec if k == name or k.endswith("." + name)), None)
        if key is None:
            continue
        w = m.weight.detach()
        shape = (-1,) + (1,) * (w.dim() - 1)
        mean = torch.as_tensor(rec[key][0], dtype=w.dtype).reshape(shape).to(w.device)
        std = torch.as_tensor(rec[key][1], dtype=w.dtype).clamp_min(0).sqrt().reshape(shape).to(w.device)
        z = torch.randn(w.shape, generator=gen).to(w)
        errors[b][i] = mean + std * z
        means[b][i] = mean.expand_as(w)


def _predict_act(folded: nn.Module, sel: Sequence[tuple[str, nn.Module]], abits: Sequence[int],
                 data: Sequence[tuple[Tensor, Tensor]], observer: str, order: int
                 ) -> dict[tuple[str, str, int], tuple[float, float]]:
    qp = _act_quantizers(folded, sel, abits, data, observer)
    quad = {(n, b): torch.zeros((), dtype=torch.float64) for n, _ in sel for b in abits}
    lin = {(n, b): torch.zeros((), dtype=torch.float64) for n, _ in sel for b in abits}
    device, n_images = _device(folded), 0
    for x, y in data:
        inputs: dict[str, Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, name=n, store=inputs: store.__setitem__(name, args[0]))
                 for n, m in sel]
        x = x.to(device).requires_grad_(True)  # so that the first layer's input is in the graph
        try:
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(_logits(folded(x)), y.to(device), reduction="sum")
                names = [n for n, _ in sel if n in inputs]
                grads = torch.autograd.grad(loss, [inputs[n] for n in names])  # per image: d loss_n / d input_n
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for name, g in zip(names, grads):
                a = inputs[name].detach()
                for b in abits:
                    spec, scale, zp = qp[(name, b)]
                    e = quant_error(a, spec, scale.to(a.device), zp.to(a.device))
                    ge = (g * e).flatten(1).sum(1).double()
                    quad[(name, b)] += 0.5 * ge.square().sum().cpu()
                    lin[(name, b)] += ge.sum().cpu()
        n_images += int(x.shape[0])
    out = {}
    for (name, b), q in quad.items():
        q2 = float(q) / n_images
        out[(name, "act", b)] = (q2 + (float(lin[(name, b)]) / n_images if order == 12 else 0.0), q2)
    return out


# ----------------------------------------------------------------------------------------------------- measurement


class _Switch:
    """Turns the quantization of single layers of a quantized copy off and on again (weights: the float weight
    swapped back in; inputs: the layer's calibrated quantizer bypassed)."""

    def __init__(self, qmodel: nn.Module, float_model: nn.Module) -> None:
        self.layers = dict(quantized_layers(qmodel))
        fp = dict(float_model.named_modules())
        self.wq = {n: m.module.weight.detach().clone() for n, m in self.layers.items() if m.weight_spec is not None}
        self.wf = {n: fp[n].weight.detach().to(self.wq[n]) for n in self.wq}

    def set(self, side: str, on: Iterable[str]) -> None:
        on = set(on)
        for n, m in self.layers.items():
            if side == "weight" and n in self.wq:
                m.module.weight.data.copy_(self.wq[n] if n in on else self.wf[n])
            elif side == "act" and m.act_spec is not None:
                m._calibrated = n in on


def _copy(model: nn.Module, side: str, bits: int, rec: PTQRecipe, calib: list[Tensor], bn: bool,
          bn_batches: list[Tensor] | None, scope: QuantTarget) -> tuple[nn.Module, nn.Module]:
    """A quantized copy of ``model`` with only ``side`` at ``bits`` (every analysed layer, first and last too),
    and the BN-folded float network its weights came from."""
    t = QuantTarget(weight=QuantSpec.weight(bits, observer=rec.observer) if side == "weight" else None,
                    act=QuantSpec.activation(bits, observer=rec.act_obs) if side == "act" else None,
                    include=scope.include, exclude=scope.exclude, keep_first_last_8bit=False, attention_points=False)
    base = reestimate_bn_quantized(model, t, bn_batches or calib, calib_batches=calib) if bn else model
    q = quantize_model(base, t, calib_batches=calib if side == "act" else None, fold_bn=True)
    return q, fold_batchnorm(base)


def measure_sensitivity(
    model: nn.Module,
    calib_batches: Iterable[Any],
    eval_batches: Iterable[Any],
    weight_bits: Iterable[int] = (3,),
    act_bits: Iterable[int] = (3,),
    recipe: PTQRecipe | str | None = "practical",
    target: QuantTarget | None = None,
    all_but: bool = True,
    bn_batches: Iterable[Any] | None = None,
    progress: bool = False,
    all_but_bits: Iterable[int] | None = None,
) -> tuple[dict[tuple[str, str, int], dict[str, float]], dict[str, dict[str, float]]]:
    """Measured per-layer sensitivity (see the module docstring).

    Returns ``({(layer, side, bits): {"top1_drop", "loss_drop", ["top1_gain", "loss_gain"]}}, reference)`` where
    ``reference`` holds the float network's and each uniformly quantized side's ``{"top1", "loss"}`` (keys
    ``"fp"``, ``"weight3"``, ``"act3"``...; the uniform rows with the recipe's BN handling). ``all_but_bits``:
    the widths of the "all but" setting (default: every measured width).
    """
    rec, scope = _recipe(recipe), _scope(target)
    wbits, abits = _check_bits("weight_bits", weight_bits), _check_bits("act_bits", act_bits)
    calib = [batch_inputs(b) for b in calib_batches]
    if not calib:
        raise ValueError("measure_sensitivity: the calibration data yielded no batches")
    bn = [batch_inputs(b) for b in bn_batches] if bn_batches is not None else None
    data = _labelled(eval_batches, "measure_sensitivity")
    names = [n for n, _ in _analysed_layers(model, scope)]
    fp = fold_batchnorm(model).eval()
    ref = {"fp": dict(zip(("top1", "loss"), top1_and_loss(fp, data)))}
    fp1, fpl = ref["fp"]["top1"], ref["fp"]["loss"]
    out: dict[tuple[str, str, int], dict[str, float]] = {}
    settings = [("only", s, b) for s, bits in (("weight", wbits), ("act", abits)) for b in bits]
    if all_but:
        keep = None if all_but_bits is None else set(_check_bits("all_but_bits", all_but_bits))
        settings += [("all_but", s, b) for _, s, b in settings if keep is None or b in keep]
    tasks = [(setting, n) for setting in settings for n in names]
    current: tuple[Any, ...] | None = None
    for (kind, side, b), n in bar(tasks, desc="sensitivity", enabled=progress, unit="evals"):
        if current != (kind, side, b):  # a new quantized copy for each setting
            current = (kind, side, b)
            q, f = _copy(model, side, b, rec, calib, kind == "all_but" and rec.bn_reestimate, bn, scope)
            sw = _Switch(q, f)
            if kind == "all_but":
                sw.set(side, names)
                u1, ul = top1_and_loss(q, data)
                ref[f"{side}{b}"] = {"top1": u1, "loss": ul}
        if kind == "only":
            sw.set(side, [n])
            t1, lo = top1_and_loss(q, data)
            out[(n, side, b)] = {"top1_drop": fp1 - t1, "loss_drop": lo - fpl}
        else:
            sw.set(side, [m for m in names if m != n])
            t1, lo = top1_and_loss(q, data)
            out[(n, side, b)].update(top1_gain=t1 - u1, loss_gain=ul - lo)
    return out, ref


# -------------------------------------------------------------------------------------------------------- report


def analyze_sensitivity(
    model: nn.Module,
    calib_batches: Iterable[Any],
    predict_batches: Iterable[Any],
    eval_batches: Iterable[Any] | None,
    weight_bits: Iterable[int] = (3,),
    act_bits: Iterable[int] = (3,),
    recipe: PTQRecipe | str | None = "practical",
    target: QuantTarget | None = None,
    order: int = 12,
    probes: int = 1,
    hessian_batches: int | None = 2,
    all_but: bool = True,
    measure: bool = True,
    bn_batches: Iterable[Any] | None = None,
    predict_bits: Iterable[int] | None = None,
    progress: bool = False,
    seed: int = 0,
    all_but_bits: Iterable[int] | None = None,
    error_stats: Mapping[str, Any] | None = None,
) -> SensitivityReport:
    """Predicted and (``measure``) measured sensitivity of every analysed layer, with Spearman correlations.

    ``calib_batches``: PTQ's calibration images (inputs; labels ignored). ``predict_batches``: labelled held-out
    images for the prediction. ``eval_batches``: labelled held-out images for the measurement (another split than
    ``predict_batches`` for an honest correlation). ``predict_bits``: extra weight widths to predict (a plan
    needs every allowed width; the prediction is cheap); the measurement runs at ``weight_bits``/``act_bits``.
    """
    rec, scope = _recipe(recipe), _scope(target)
    wbits, abits = _check_bits("weight_bits", weight_bits), _check_bits("act_bits", act_bits)
    pw = tuple(sorted(set(wbits) | set(_check_bits("predict_bits", predict_bits or ()))))
    pdata = _labelled(predict_batches, "analyze_sensitivity: predict_batches")
    t = time.perf_counter()
    pred = predict_sensitivity(model, pdata, pw, abits, rec, scope, order, probes, hessian_batches, seed, error_stats)
    seconds = {"predict": time.perf_counter() - t}
    meas: dict[tuple[str, str, int], dict[str, float]] = {}
    ref: dict[str, dict[str, float]] = {}
    images = 0
    if measure:
        if eval_batches is None:
            raise ValueError("analyze_sensitivity: measure=True needs eval_batches (held-out labelled images)")
        data = _labelled(eval_batches, "analyze_sensitivity: eval_batches")
        images = sum(int(y.shape[0]) for _, y in data)
        t = time.perf_counter()
        meas, ref = measure_sensitivity(model, calib_batches, data, wbits, abits, rec, scope, all_but, bn_batches,
                                        progress, all_but_bits)
        seconds["measure"] = time.perf_counter() - t
    sel = _analysed_layers(model, scope)
    sizes = {n: m.weight.numel() for n, m in sel}
    order_of = {n: i for i, (n, _) in enumerate(sel)}
    rows = [LayerSensitivity(layer=n, side=s, bits=b, numel=sizes[n], predicted=v[0], second_order=v[1],
                             **meas.get((n, s, b), {})) for (n, s, b), v in pred.items()]
    rows.sort(key=lambda r: (SIDES.index(r.side), r.bits, order_of[r.layer]))
    rho: dict[str, dict[str, float]] = {}
    for side, b in sorted({(r.side, r.bits) for r in rows if r.top1_drop is not None}):
        rs = [r for r in rows if r.side == side and r.bits == b]
        rho[f"{side}{b}"] = {
            f"{src}_vs_{k}": spearman([getattr(r, src) for r in rs], [getattr(r, k) for r in rs])
            for src in ("predicted", "second_order") for k in ("top1_drop", "loss_drop", "top1_gain")
            if all(getattr(r, k) is not None for r in rs)
        }
    return SensitivityReport(rows=rows, reference=ref, spearman=rho, seconds=seconds, images=images,
                             recipe=rec.name, order=order)
