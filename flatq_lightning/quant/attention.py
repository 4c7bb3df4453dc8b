"""Quantization points inside timm attention: Q and K before ``Q·Kᵀ``, V and the softmax output before ``A·V``.

timm's :class:`timm.layers.Attention` runs both matrix products inside its ``forward`` (fused SDPA), so their
operands are not inputs of any module and forward pre-hooks cannot reach them. ViT PTQ papers' W4A4 quantizes
them too. :func:`attach_attention_points` makes them reachable with a reversible patch:

- it registers four parameter-free :class:`QuantPoint` children (``quant_q``, ``quant_k``, ``quant_v``,
  ``quant_attn``) whose *input* is the operand; the recorder, the noise callbacks, the MSE term and
  ``quantize_model`` treat a point like the input of any layer (pre-hooks), but a point has no weight;
- it switches the module's class to a subclass (:class:`QuantizedAttention` for timm's own class) whose
  ``forward`` is :func:`quantized_attention_forward`: timm's explicit (non-fused) math with the points on
  the operands. Weights, buffers and ``state_dict`` keys are untouched (points hold no state), ``deepcopy``
  and pickling keep working (the class is looked up like any other), and
- :func:`detach_attention_points` removes the points and restores timm's class, so
  ``type(module) is timm.layers.Attention`` and its fused path run again.

Example:
    >>> import timm, torch
    >>> vit = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> ref = vit(x)
    >>> points = attach_attention_points(vit)
    >>> points[:4]
    ['blocks.0.attn.quant_q', 'blocks.0.attn.quant_k', 'blocks.0.attn.quant_v', 'blocks.0.attn.quant_attn']
    >>> torch.allclose(vit(x), ref, atol=1e-5)
    True
    >>> restored = detach_attention_points(vit)
    >>> type(vit.blocks[0].attn).__name__
    'Attention'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from torch import Tensor, nn

__all__ = [
    "POINT_NAMES",
    "QuantPoint",
    "QuantizedAttention",
    "attach_attention_points",
    "attention_points",
    "detach_attention_points",
    "is_patched_attention",
    "quantized_attention_forward",
]

#: the points of one attention module, in the order its forward meets them
POINT_NAMES: tuple[str, ...] = ("quant_q", "quant_k", "quant_v", "quant_attn")


class QuantPoint(nn.Identity):
    """A parameter-free marker: its *input* is a quantization point.

    It returns its input unchanged; what makes it useful is that forward pre-hooks (the recorder's statistics,
    the activation noise, the MSE term's fake-quant) and ``quantize_model``'s ``QuantizedLayer`` wrapper see
    that input like the input of a Linear. It has no weight, so only activation quantization applies, and no
    state, so ``state_dict`` keys do not change when points are added.

    Example:
        >>> import torch
        >>> p = QuantPoint()
        >>> x = torch.randn(3)
        >>> p(x) is x, len(p.state_dict())
        (True, 0)
    """


def quantized_attention_forward(
    self: Attention, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """timm ``Attention.forward`` (non-fused path) with the four operands passed through the points.

    A copy of timm 1.0's math: gate, ``q_norm``/``k_norm``, scale, mask (timm's own helpers), softmax,
    ``attn_drop``, ``norm``, ``proj``, ``proj_drop``. ``quant_q`` sees ``q`` *before* the ``head_dim**-0.5``
    scaling, i.e. ``q`` itself, the quantity the PTQ literature quantizes; with a per-tensor grid the choice
    only moves float rounding (``Q(c·q) = c·Q(q)``: the range and the grid scale with ``c``). ``quant_v`` sees
    ``V``, ``quant_attn`` the softmax output before attention dropout.

    Example:
        >>> import torch
        >>> attn = Attention(16, num_heads=2).eval()
        >>> with attention_points(attn):
        ...     y = attn(torch.randn(1, 5, 16))
        >>> y.shape
        torch.Size([1, 5, 16])
    """
    B, N, C = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = self.quant_q(q), self.quant_k(k), self.quant_v(v)

    q = q * self.scale
    attn = q @ k.transpose(-2, -1)
    attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal)
    attn = maybe_add_mask(attn, attn_bias)
    attn = attn.softmax(dim=-1)
    attn = self.quant_attn(attn)
    attn = self.attn_drop(attn)
    x = attn @ v

    x = x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", C))
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


class QuantizedAttention(Attention):
    """timm's :class:`~timm.layers.Attention` with quantization points on the operands of both products.

    Not built directly: :func:`attach_attention_points` switches an existing module's class to this one (same
    parameters, buffers and ``state_dict`` keys) and :func:`detach_attention_points` switches it back.

    Example:
        >>> attn = Attention(16, num_heads=2)
        >>> _ = attach_attention_points(attn)
        >>> type(attn).__name__, attn.quant_q
        ('QuantizedAttention', QuantPoint())
        >>> _ = detach_attention_points(attn)
    """

    #: the class to restore on detach
    _flatq_original: type[Attention] = Attention
    forward = quantized_attention_forward  # type: ignore[assignment]


#: patched classes by original class; timm's own class maps to the importable QuantizedAttention
_PATCHED: dict[type[Attention], type[Attention]] = {Attention: QuantizedAttention}


def _patched_class(cls: type[Attention]) -> type[Attention]:
    """The patched subclass of ``cls`` (created once per class and registered in this module's namespace, so
    instances pickle within the process; timm's own class maps to :class:`QuantizedAttention`)."""
    sub = _PATCHED.get(cls)
    if sub is None:
        name = "Quantized_" + f"{cls.__module__}.{cls.__qualname__}".replace(".", "_")
        sub = type(name, (cls,), {"forward": quantized_attention_forward, "_flatq_original": cls,
                                  "__module__": __name__, "__qualname__": name,
                                  "__doc__": f"{cls.__qualname__} with attention quantization points."})
        globals()[name] = sub
        _PATCHED[cls] = sub
    return sub


def is_patched_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module currently carrying quantization points.

    Example:
        >>> is_patched_attention(Attention(8, num_heads=2))
        False
    """
    return isinstance(module, Attention) and "_flatq_original" in type(module).__dict__


def _patchable(module: nn.Module) -> bool:
    # only modules whose forward is timm's own: a subclass with its own forward computes something else
    return isinstance(module, Attention) and not is_patched_attention(module) and type(module).forward is Attention.forward


def attach_attention_points(model: nn.Module) -> list[str]:
    """Patch every timm ``Attention`` in ``model`` (itself included) with four :class:`QuantPoint` s.

    Modules that already carry points, and subclasses that override ``forward``, are left alone, so calling
    it twice is harmless. Returns the qualified names of the points it created (registration order), empty
    when there was nothing to patch. The patch is reversible: :func:`detach_attention_points`.

    Example:
        >>> attn = Attention(16, num_heads=2)
        >>> attach_attention_points(attn)
        ['quant_q', 'quant_k', 'quant_v', 'quant_attn']
        >>> attach_attention_points(attn)
        []
        >>> detach_attention_points(attn)
        ['']
    """
    targets = [(name, m) for name, m in model.named_modules() if _patchable(m)]
    created: list[str] = []
    for name, m in targets:
        clash = [p for p in POINT_NAMES if hasattr(m, p)]
        if clash:
            raise ValueError(f"attach_attention_points: attention module {name!r} already has attribute(s) {clash}")
        for p in POINT_NAMES:
            m.add_module(p, QuantPoint())
        m.__class__ = _patched_class(type(m))
        pre = f"{name}." if name else ""
        created += [pre + p for p in POINT_NAMES]
    return created


def detach_attention_points(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Undo :func:`attach_attention_points`: remove the points and restore timm's class (and fused path).

    ``names``: the point names returned by ``attach_attention_points`` (only their attention modules are
    restored); by default every patched attention module in ``model``. Returns the names of the restored
    attention modules. Idempotent.

    Example:
        >>> attn = Attention(16, num_heads=2)
        >>> pts = attach_attention_points(attn)
        >>> detach_attention_points(attn, pts), type(attn) is Attention, hasattr(attn, "quant_q")
        ([''], True, False)
    """
    wanted = None if names is None else {n.rpartition(".")[0] for n in names}
    targets = [
        (name, m) for name, m in model.named_modules()
        if is_patched_attention(m) and (wanted is None or name in wanted)
    ]
    for _, m in targets:
        m.__class__ = type(m).__dict__["_flatq_original"]
        for p in POINT_NAMES:
            m._modules.pop(p, None)
    return [name for name, _ in targets]


@contextlib.contextmanager
def attention_points(model: nn.Module) -> Iterator[list[str]]:
    """Points attached for the duration of the block (only the ones attached here are removed afterwards).

    Example:
        >>> attn = Attention(16, num_heads=2)
        >>> with attention_points(attn) as pts:
        ...     len(pts), type(attn).__name__
        (4, 'QuantizedAttention')
        >>> type(attn).__name__
        'Attention'
    """
    names = attach_attention_points(model)
    try:
        yield names
    finally:
        if names:
            detach_attention_points(model, names)

