"""Block reconstruction of a quantized model: learned rounding and activation step sizes (BRECQ/QDrop-style).

Round-to-nearest (RTN) rounds every weight on its own. Reconstruction instead chooses, for each weight, whether
to round down or up, so that the *block's output* stays close to the FP block's (AdaRound, BRECQ), and learns
each activation quantizer's step size on the same objective (LSQ), while the activation quantization is dropped
at random during the optimisation (QDrop), which makes the solution flatter for the inputs it will meet.

For each block, in the order the forward runs them:

- its FP output ``Y_fp`` (the reference FP network) and its input ``X_q`` in the quantized network (every earlier
  block already reconstructed) are cached for the calibration images, once (two tensors of the block's size per
  image: :func:`cache_bytes` says how much that is);
- each quantized weight becomes ``(floor(W/s) + h(α)).clamp(qmin, qmax)·s`` with AdaRound's rectified sigmoid
  ``h(α) = clamp(σ(α)·(ζ − γ) + γ, 0, 1)``, α initialised so that ``h(α)`` is the fractional part (the soft
  weight starts at ``W``); ``s`` is the weight scale the observer chose, kept fixed;
- each activation quantizer's scale becomes a parameter (LSQ: the straight-through gradient of
  :func:`~flatq_lightning.quant.ops.fake_quantize` w.r.t. the scale), initialised from the calibrated range;
  its zero point stays;
- ``loss = Σ_features (block_q(X_q) − Y_fp)²  (mean over the batch) + λ·Σ (1 − |2h − 1|^β)``, β annealed from
  ``beta[0]`` to ``beta[1]`` after a warm-up without the regulariser; Adam on α and on the scales;
- QDrop: during the optimisation each element of each activation quantizer's input keeps its float value with
  probability ``drop_prob`` (the quantization is dropped), otherwise it is quantized;
- at the end ``h`` is made hard (``α ≥ 0``: up, else down), so every weight is an integer of the same grid RTN
  uses, at most one step from its RTN value; the layer's stored weight, ``act_scale`` and SQNR are updated and the
  model is an ordinary fake-quant model again (the exports read the same integers).

What a block is: a module whose class name is in ``Reconstruction.blocks`` (default :data:`DEFAULT_BLOCK_TYPES`:
ResNet ``BasicBlock``/``Bottleneck`` of timm, torchvision and the app, timm ViT ``Block``, MobileNet
``InvertedResidual``/``DepthwiseSeparableConv``), the outermost one when they nest; every quantized layer outside
such a block is a block of its own. A rule is a sequence of class names or shell patterns on module names
(``"layer*.?"``), or a callable ``(name, module) -> bool``.

No Lightning here; :func:`~flatq_lightning.ptq.runner.run_ptq` runs it through the ``"reconstruct"`` recipe.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatq_lightning.quant import QuantTarget, quantize_model
    >>> torch.manual_seed(0) and None
    >>> fp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    >>> x = torch.randn(64, 8)
    >>> q = quantize_model(fp, QuantTarget.preset("w2a8", keep_first_last_8bit=False), calib_batches=[x])
    >>> res = reconstruct(q, fp, fp, x, Reconstruction(iters=200, batch_size=16, calib_images=64))
    >>> [r.name for r in res], all(r.loss <= r.loss_rtn for r in res)
    (['0', '2', '4'], True)
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .attention import QuantPoint, attach_attention_points
from .ops import SCALE_EPS, fake_quantize, sqnr_db
from .placement import attach_placement_points, placement_points
from .quantize import QuantizedLayer, quantized_layers

__all__ = [
    "DEFAULT_BLOCK_TYPES",
    "BlockResult",
    "Reconstruction",
    "cache_bytes",
    "find_blocks",
    "reconstruct",
]

#: class names that make a block by default (the outermost match wins when they nest)
DEFAULT_BLOCK_TYPES: tuple[str, ...] = (
    "BasicBlock", "Bottleneck", "Block", "ResPostBlock", "InvertedResidual", "DepthwiseSeparableConv",
)
#: AdaRound's rectified-sigmoid stretch
ZETA, GAMMA = 1.1, -0.1

BlockRule = Sequence[str] | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class Reconstruction:
    """Settings of block reconstruction (see the module docstring for what each does).

    Example:
        >>> Reconstruction(iters=500).drop_prob
        0.5
        >>> Reconstruction(drop_prob=1.5)
        Traceback (most recent call last):
        ...
        ValueError: Reconstruction.drop_prob must be in [0, 1] (the probability of keeping an activation in float), got 1.5
    """

    #: optimisation steps per block (0: no learning, the RTN model is returned unchanged)
    iters: int = 500
    #: images per step
    batch_size: int = 32
    #: calibration images whose block inputs and outputs are cached (drawn from the calibration loader)
    calib_images: int = 1024
    #: Adam learning rate of the rounding variables α (AdaRound takes 1e-3 over 10-20k steps; over 500 steps 3e-2
    #: moves them as far, and on ResNet-20 W2A4 it brought every block below round-to-nearest where 3e-3 did not)
    lr_round: float = 3e-2
    #: Adam learning rate of the activation step sizes (cosine-annealed to 0); 0 keeps the observer's scales
    lr_act: float = 4e-4
    #: λ, the weight of the rounding regulariser
    round_weight: float = 0.01
    #: β of the regulariser, annealed linearly from the first to the second value after the warm-up
    beta: tuple[float, float] = (20.0, 2.0)
    #: fraction of the steps without the regulariser
    warmup: float = 0.2
    #: QDrop: probability that an element keeps its float value at an activation quantizer during the optimisation
    drop_prob: float = 0.5
    #: seed of the batch draws and the drop masks (the result is deterministic for a seed on one device)
    seed: int = 0
    #: the block rule: class names or module-name patterns (``None``: :data:`DEFAULT_BLOCK_TYPES`)
    blocks: tuple[str, ...] | None = None
    #: where the cached block inputs/outputs live: ``None`` (the model's device) or e.g. ``"cpu"`` when a GPU's
    #: memory would not hold them (each step then copies one batch over)
    cache_device: str | None = None

    def __post_init__(self) -> None:
        def whole(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"Reconstruction.{name} must be an int >= {lo}, got {v!r}")

        def number(name: str, lo: float, hi: float, lo_open: bool = False, what: str = "") -> None:
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            ok = ok and (lo < v if lo_open else lo <= v) and v <= hi
            if not ok:
                rng = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
                raise ValueError(f"Reconstruction.{name} must be in {rng}{what}, got {v!r}")

        whole("iters", 0)
        whole("batch_size", 1)
        whole("calib_images", 1)
        whole("seed", 0)
        number("lr_round", 0.0, math.inf, lo_open=True)
        number("lr_act", 0.0, math.inf)
        number("round_weight", 0.0, math.inf)
        number("warmup", 0.0, 1.0)
        number("drop_prob", 0.0, 1.0, what=" (the probability of keeping an activation in float)")
        b = self.beta
        if (not isinstance(b, (tuple, list)) or len(b) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in b)):
            raise ValueError(f"Reconstruction.beta must be two positive numbers (start, end), got {b!r}")
        object.__setattr__(self, "beta", (float(b[0]), float(b[1])))
        if self.blocks is not None:
            if isinstance(self.blocks, str) or not all(isinstance(p, str) and p for p in self.blocks):
                raise ValueError(
                    f"Reconstruction.blocks must be None or a sequence of class names / module-name patterns, "
                    f"got {self.blocks!r}"
                )
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.cache_device is not None and not isinstance(self.cache_device, str):
            raise ValueError(f"Reconstruction.cache_device must be None or a device string like 'cpu', got {self.cache_device!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["beta"] = list(self.beta)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reconstruction:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Reconstruction setting(s) {unknown}; the settings are {sorted(known)}")
        d = dict(d)
        if d.get("beta") is not None:
            d["beta"] = tuple(d["beta"])
        if d.get("blocks") is not None:
            d["blocks"] = tuple(d["blocks"])
        return cls(**d)


@dataclass
class BlockResult:
    """One block's reconstruction: its output MSE (mean over the batch of the squared error summed over the
    features, on up to 256 of the calibration images, no drop) with round-to-nearest and after."""

    name: str
    kind: str
    layers: list[str]
    iters: int
    seconds: float
    loss_rtn: float
    loss: float
    #: weights whose rounding differs from round-to-nearest (one grid step)
    flipped: int = 0
    weights: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# blocks


def _matcher(rule: BlockRule | None) -> Callable[[str, nn.Module], bool]:
    if callable(rule):
        return rule
    pats = tuple(rule) if rule is not None else DEFAULT_BLOCK_TYPES

    def match(name: str, module: nn.Module) -> bool:
        cls = type(module)
        return any(p in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}") or fnmatch.fnmatchcase(name, p)
                   for p in pats)

    return match


def find_blocks(model: nn.Module, rule: BlockRule | None = None) -> list[tuple[str, list[str]]]:
    """The reconstruction blocks of a quantized model: ``[(block name, [its QuantizedLayer names])]`` in
    registration order (:func:`reconstruct` runs them in forward order).

    A module matching ``rule`` (see the module docstring) that holds quantized layers is a block (the outermost
    match when they nest); a quantized layer outside every block is a block of its own. A rule given
    explicitly that matches no module raises ``ValueError`` naming the classes the model has.

    Example:
        >>> from flatq_lightning.quant import quantize_model
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
        >>> q = quantize_model(net, "w4a4", calib_batches=[torch.randn(8, 4)])
        >>> find_blocks(q, ["1"])
        [('0', ['0']), ('1', ['1.0', '1.2'])]
    """
    match = _matcher(rule)
    layers = [n for n, _ in quantized_layers(model)]
    blocks: list[tuple[str, list[str]]] = []
    matched_any = False
    taken: set[str] = set()
    for name, mod in model.named_modules():
        if not name or isinstance(mod, QuantizedLayer) or any(name.startswith(b + ".") for b, _ in blocks):
            continue
        if not match(name, mod):
            continue
        matched_any = True
        inner = [n for n in layers if n.startswith(name + ".")]
        if inner:
            blocks.append((name, inner))
            taken.update(inner)
    if rule is not None and not matched_any:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n and not isinstance(m, QuantizedLayer)})
        raise ValueError(
            f"the reconstruction block rule {rule!r} matches no module of the model; its module classes are "
            f"{kinds[:20]}{' …' if len(kinds) > 20 else ''} (name classes, or patterns on module names like 'layer1.*')"
        )
    singles = [(n, [n]) for n in layers if n not in taken]
    order = {n: i for i, n in enumerate(layers)}
    return sorted(blocks + singles, key=lambda b: order[b[1][0]])


def _forward_order(model: nn.Module, names: list[str], x: Tensor) -> list[str]:
    """``names`` in the order the forward first calls them (one forward on ``x``)."""
    seen: list[str] = []
    handles = []
    for n in names:
        def pre(mod: nn.Module, args: Any, n: str = n) -> None:
            if n not in seen:
                seen.append(n)
        handles.append(model.get_submodule(n).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"reconstruction: the forward never calls {missing[:5]}: they cannot be reconstructed")
    return seen


@torch.no_grad()
def cache_bytes(qmodel: nn.Module, example: Tensor, calib_images: int = 1024,
                rule: BlockRule | None = None) -> dict[str, int]:
    """What :func:`reconstruct` caches per block for ``calib_images`` images like ``example`` (one image or a
    batch): the block's quantized-network input and FP output, in the model's dtype. The peak is the largest
    value; the cache lives on ``Reconstruction.cache_device``.

    Example:
        >>> from flatq_lightning.quant import quantize_model
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        >>> q = quantize_model(net, "w4a4", calib_batches=[torch.randn(2, 3, 8, 8)])
        >>> cache_bytes(q, torch.randn(1, 3, 8, 8), calib_images=100)   # (3 + 8)·64 and (8 + 8)·64 floats each
        {'0': 281600, '2': 409600}
    """
    sizes: dict[str, int] = {}
    handles = []
    for name, _ in find_blocks(qmodel, rule):
        def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            if name not in sizes and args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                per = (args[0][0].numel() * args[0].element_size() + out[0].numel() * out.element_size())
                sizes[name] = per * calib_images
        handles.append(qmodel.get_submodule(name).register_forward_hook(hook))
    try:
        qmodel(example[:1].to(_device(qmodel)))
    finally:
        for h in handles:
            h.remove()
    return sizes


# ---------------------------------------------------------------------------------------------------------------
# caching a block's inputs and outputs


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture(model: nn.Module, name: str, inputs: Tensor, chunk: int, device: torch.device,
             cache: torch.device, output: bool) -> Tensor:
    """The input (``output=False``) or the output of ``model.<name>`` for every row of ``inputs``, each forward
    stopped right after the block."""
    xs: list[Tensor] = []

    def check(mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        tensors = [a for a in args if isinstance(a, Tensor)] + [v for v in kwargs.values() if isinstance(v, Tensor)]
        if len(args) != 1 or not isinstance(args[0], Tensor) or len(tensors) != 1:
            raise ValueError(
                f"reconstruction: block {name!r} ({type(mod).__name__}) is called with {len(tensors)} tensor "
                "arguments; a block must take one tensor (use a finer block rule, e.g. its layers)"
            )

    def pre(mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        # the input as the block receives it, before its own pre-hooks (a placement point quantizes it there)
        check(mod, args, kwargs)
        xs.append(args[0].detach().to(cache))
        raise _Stop

    def hook(mod: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        check(mod, args, kwargs)
        if not isinstance(out, Tensor):
            raise ValueError(f"reconstruction: block {name!r} ({type(mod).__name__}) returns {type(out).__name__}, "
                             "not a tensor; use a finer block rule")
        xs.append(out.detach().to(cache))
        raise _Stop

    mod = model.get_submodule(name)
    h = (mod.register_forward_hook(hook, with_kwargs=True) if output
         else mod.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
    try:
        for i in range(0, inputs.shape[0], chunk):
            try:
                model(inputs[i:i + chunk].to(device))
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(xs)


# ---------------------------------------------------------------------------------------------------------------
# one layer's learnable quantizer


def _h(alpha: Tensor) -> Tensor:
    return (torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


class _LayerRecon:
    """The learnable state of one :class:`QuantizedLayer`: rounding α of its weight, the step size of its input."""

    def __init__(self, layer: QuantizedLayer, w_fp: Tensor | None, gen: torch.Generator) -> None:
        self.gen = gen
        self.drop_prob = 0.0
        self.hard = False
        self.alpha: nn.Parameter | None = None
        self.act_scale: nn.Parameter | None = None
        ws = layer.weight_spec
        if ws is not None:
            if w_fp is None or w_fp.shape != layer.module.weight.shape:
                raise ValueError("reconstruction: the source model's weight does not match the quantized layer's")
            shape = [-1] + [1] * (w_fp.dim() - 1) if ws.per_channel and layer.weight_scale.dim() > 0 else []
            self.s_w = layer.weight_scale.detach().float().reshape(shape) if shape else layer.weight_scale.detach().float()
            v = torch.div(w_fp.detach().float(), self.s_w)  # the arithmetic of fake_quantize
            self.floor = torch.floor(v)
            self.rtn = torch.round(v).clamp_(ws.qmin, ws.qmax)
            rest = (v - self.floor).clamp(1e-4, 1 - 1e-4)
            self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))
            self.qmin, self.qmax = ws.qmin, ws.qmax
        if layer.act_spec is not None and layer._calibrated:
            self.act_scale = nn.Parameter(layer.act_scale.detach().float().clone())

    def codes(self) -> Tensor:
        """The integer codes with hard rounding (float32 holding integers)."""
        assert self.alpha is not None
        return (self.floor + (self.alpha.detach() >= 0).float()).clamp_(self.qmin, self.qmax)

    def weight(self) -> Tensor:
        assert self.alpha is not None
        up = (self.alpha >= 0).float() if self.hard else _h(self.alpha)
        return (self.floor + up).clamp(self.qmin, self.qmax) * self.s_w

    def round_loss(self, beta: float) -> Tensor:
        assert self.alpha is not None
        return (1.0 - (2.0 * _h(self.alpha) - 1.0).abs().pow(beta)).sum()

    def forward(self, layer: QuantizedLayer, x: Tensor) -> Tensor:
        if self.act_scale is not None:
            s = self.act_scale.clamp_min(SCALE_EPS)
            xq = fake_quantize(x, layer.act_spec, s, layer.act_zero_point, check_scale=False)
            if self.drop_prob > 0.0:
                keep = torch.rand(x.shape, generator=self.gen, device=self.gen.device).to(x.device) < self.drop_prob
                xq = torch.where(keep, x, xq)
            x = xq
        if self.alpha is None:
            return layer.module(x)
        w = self.weight().to(layer.module.weight.dtype)
        return torch.func.functional_call(layer.module, {"weight": w}, (x,))

    @torch.no_grad()
    def finish(self, layer: QuantizedLayer, w_fp: Tensor | None) -> tuple[int, int]:
        """Write the hard-rounded weight and the learned step size into ``layer``; ``(flipped, weights)``."""
        flipped = n = 0
        if self.alpha is not None:
            q = self.codes()
            w = (q * self.s_w).to(layer.module.weight.dtype)  # dequantize_int's arithmetic: exact codes on export
            layer.module.weight.data.copy_(w)
            layer.weight_sqnr_db = float(sqnr_db(w_fp, w))
            flipped, n = int((q != self.rtn).sum()), q.numel()
        if self.act_scale is not None:
            layer.act_scale = self.act_scale.detach().clamp_min(SCALE_EPS).to(layer.act_scale.device).clone()
        return flipped, n


# ---------------------------------------------------------------------------------------------------------------


def _block_loss(out: Tensor, target: Tensor) -> Tensor:
    return (out.float() - target.float()).pow(2).flatten(1).sum(1).mean()


@torch.no_grad()
def _eval_loss(block: nn.Module, x: Tensor, y: Tensor, chunk: int, device: torch.device) -> float:
    total = torch.zeros((), device=device)
    for i in range(0, x.shape[0], chunk):
        out = block(x[i:i + chunk].to(device))
        total += (out.float() - y[i:i + chunk].to(device).float()).pow(2).flatten(1).sum(1).sum()
    return float(total) / x.shape[0]


def _device(model: nn.Module) -> torch.device:
    t = next(iter(model.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def _blocks_to_learn(qmodel: nn.Module, st: Reconstruction) -> list[tuple[str, list[str]]]:
    """The blocks of ``qmodel`` (:func:`find_blocks` under ``st.blocks``) with something to learn."""
    blocks = find_blocks(qmodel, st.blocks)
    if not blocks:
        raise ValueError("reconstruct: the model has no quantized layers (QuantizedLayer): quantize it first")
    # a point whose input another quantizer quantizes (placement "onnxruntime", shared) has nothing to learn
    return [(b, ls) for b, ls in blocks
            if any(qmodel.get_submodule(n).weight_spec is not None or qmodel.get_submodule(n).act_spec is not None
                   for n in ls)]


def _reference_with_points(qmodel: nn.Module, reference: nn.Module) -> nn.Module:
    """``reference``, or a copy of it with the quantization points ``qmodel`` carries (attention operands, the
    "onnxruntime" placement), so that both name their blocks and layers alike (points are identities)."""
    if any(isinstance(m, QuantPoint) for m in qmodel.modules()) and not any(
            isinstance(m, QuantPoint) for m in reference.modules()):
        reference = copy.deepcopy(reference)
        attach_attention_points(reference)  # the same module names (points are identities)
        if placement_points(qmodel):
            attach_placement_points(reference, "onnxruntime")
    return reference


def reconstruct(
    qmodel: nn.Module,
    source: nn.Module,
    reference: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    settings: Reconstruction | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
    desc: str = "reconstruct",
) -> list[BlockResult]:
    """Reconstruct ``qmodel`` block by block, in place; returns one :class:`BlockResult` per block.

    Args:
        qmodel: the fake-quant model (:func:`~flatq_lightning.quant.quantize_model`'s output, calibrated).
        source: the float model ``qmodel`` was quantized from (BN folded as in ``qmodel``): the weights whose
            rounding is learned.
        reference: the FP network whose block outputs are the targets (usually ``source``; in PTQ with BN
            re-estimation, the folded network with its own BN statistics).
        inputs: calibration images (a tensor, or a sequence of batches concatenated); the first
            ``settings.calib_images`` are used.
        settings: :class:`Reconstruction` (default settings when ``None``).
        log: called with one plain line every ``log_every`` steps and at each block's end (block name,
            step, loss); ``None`` is silent.

    ``iters=0`` leaves ``qmodel`` exactly as it was (round-to-nearest, observer step sizes).
    """
    st = settings if settings is not None else Reconstruction()
    if not isinstance(st, Reconstruction):
        raise TypeError(f"reconstruct: settings must be a Reconstruction, got {type(st).__name__}")
    x_all = inputs if isinstance(inputs, Tensor) else torch.cat([torch.as_tensor(b) for b in inputs])
    if x_all.shape[0] == 0:
        raise ValueError("reconstruct: no calibration images")
    x_all = x_all[: st.calib_images]
    blocks = _blocks_to_learn(qmodel, st)
    device = _device(qmodel)
    cache = torch.device(st.cache_device) if st.cache_device else device
    chunk = max(st.batch_size, 64)
    reference = _reference_with_points(qmodel, reference)
    ref_modes = [(m, m.training) for m in reference.modules()]
    reference.eval()
    src_weights = dict(source.named_parameters())
    order = _forward_order(qmodel, [b for b, _ in blocks], x_all[:2].to(device))
    layers_of = dict(blocks)
    was_training = qmodel.training
    qmodel.eval()
    grads = [(p, p.requires_grad) for p in qmodel.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    results: list[BlockResult] = []
    try:
        for bi, bname in enumerate(order, 1):
            t0 = time.perf_counter()
            lnames = layers_of[bname]
            block = qmodel.get_submodule(bname)
            y_fp = _capture(reference, bname, x_all, chunk, device, cache, output=True)
            x_q = _capture(qmodel, bname, x_all, chunk, device, cache, output=False)
            n_eval = min(256, x_q.shape[0])
            loss_rtn = _eval_loss(block, x_q[:n_eval], y_fp[:n_eval], chunk, device)
            kind = type(block).__name__ if bname not in lnames else type(block.module).__name__
            flipped = n_w = 0
            if st.iters > 0:
                flipped, n_w = _optimise(qmodel, bname, block, lnames, src_weights, x_q, y_fp, st, device, bi,
                                         len(order), log, log_every, desc)
            loss = _eval_loss(block, x_q[:n_eval], y_fp[:n_eval], chunk, device) if st.iters > 0 else loss_rtn
            del x_q, y_fp
            r = BlockResult(bname, kind, lnames, st.iters, time.perf_counter() - t0, loss_rtn, loss, flipped, n_w)
            results.append(r)
            if log is not None:
                log(f"{desc}: block {bi}/{len(order)} {bname} ({kind}, {len(lnames)} layer(s)) done in "
                    f"{r.seconds:.1f} s: output MSE {loss_rtn:.4g} (round-to-nearest) -> {loss:.4g}"
                    + (f", {flipped}/{n_w} weights rounded the other way" if n_w else ""))
    finally:
        for _, m in quantized_layers(qmodel):
            m.reconstruction = None
        for p, g in grads:
            p.requires_grad_(g)
        qmodel.train(was_training)
        for m, mode in ref_modes:
            m.train(mode)
    return results


def _optimise(qmodel: nn.Module, bname: str, block: nn.Module, lnames: list[str], src_weights: dict[str, Tensor],
              x_q: Tensor, y_fp: Tensor, st: Reconstruction, device: torch.device, bi: int, nb: int,
              log: Callable[[str], None] | None, log_every: int, desc: str) -> tuple[int, int]:
    """The optimisation of one block (its states attached, learned, written back and detached)."""
    gen = torch.Generator(device=device).manual_seed(st.seed * 1_000_003 + bi)
    draw = torch.Generator().manual_seed(st.seed * 1_000_003 + bi)
    states: dict[str, _LayerRecon] = {}
    for ln in lnames:
        layer = qmodel.get_submodule(ln)
        w_fp = src_weights.get(f"{ln}.weight") if layer.weight_spec is not None else None
        states[ln] = _LayerRecon(layer, w_fp, gen)
        layer.reconstruction = states[ln]
    alphas = [s.alpha for s in states.values() if s.alpha is not None]
    scales = [s.act_scale for s in states.values() if s.act_scale is not None]
    opt_w = torch.optim.Adam(alphas, lr=st.lr_round) if alphas else None
    opt_a = torch.optim.Adam(scales, lr=st.lr_act) if scales and st.lr_act > 0 else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=st.iters, eta_min=0.0) if opt_a else None
    for s in states.values():
        s.drop_prob = st.drop_prob
        if opt_a is None and s.act_scale is not None:
            s.act_scale.requires_grad_(False)
    warm = int(st.warmup * st.iters)
    n = x_q.shape[0]
    t_log = time.perf_counter()
    for it in range(st.iters):
        idx = torch.randint(0, n, (min(st.batch_size, n),), generator=draw)
        out = block(x_q[idx].to(device, non_blocking=True))
        rec = _block_loss(out, y_fp[idx].to(device, non_blocking=True))
        loss = rec
        if it >= warm and alphas:
            frac = (it - warm) / max(1, st.iters - warm)
            beta = st.beta[1] + (st.beta[0] - st.beta[1]) * (1.0 - frac)  # linear, as AdaRound/BRECQ
            loss = rec + st.round_weight * sum(s.round_loss(beta) for s in states.values() if s.alpha is not None)
        if opt_w:
            opt_w.zero_grad(set_to_none=True)
        if opt_a:
            opt_a.zero_grad(set_to_none=True)
        loss.backward()
        if opt_w:
            opt_w.step()
        if opt_a:
            opt_a.step()
            sched.step()
        if log is not None and ((it + 1) % log_every == 0 or it + 1 == st.iters) and time.perf_counter() - t_log > 2.0:
            t_log = time.perf_counter()
            log(f"{desc}: block {bi}/{nb} {bname} step {it + 1}/{st.iters} output MSE {float(rec):.4g} "
                f"total {float(loss):.4g}")
    flipped = n_w = 0
    for ln, s in states.items():
        layer = qmodel.get_submodule(ln)
        s.hard = True
        f, k = s.finish(layer, src_weights.get(f"{ln}.weight"))
        flipped, n_w = flipped + f, n_w + k
        layer.reconstruction = None
    return flipped, n_w
