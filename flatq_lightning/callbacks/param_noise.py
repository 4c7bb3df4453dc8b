"""In-place parameter noise: ``δ_i = a_i + b_i ⊙ ε(step, i)`` put into, moved inside and taken out of a list of
parameters, without a copy of the weights.

:class:`ParamNoise` is the engine behind :class:`~flatq_lightning.callbacks.weight_noise.DifferentialNoiseInjection`
and needs no Trainer: give it the parameters (one tensor per noisy weight, output channels along dim 0) and a
:class:`~flatq_lightning.callbacks.noise_source.NoiseSource`; build a :class:`NoiseSnapshot` per step from
per-output-channel coefficients (:meth:`ParamNoise.snapshot`), then :meth:`~ParamNoise.put` it into clean
parameters, :meth:`~ParamNoise.move_to` the next step's (``δ_new − δ_old`` in one pass per parameter: the
differential update) and :meth:`~ParamNoise.remove` it.

What it promises:

* ``ε`` is regenerated from ``(seed, step, i)``, never stored: :meth:`~ParamNoise.noise` returns the δ inside a
  parameter bit for bit the same every time, and another step gives another draw;
* ``δ`` has mean ``a`` and standard deviation ``b`` per output channel (times the std of the source's standard
  noise: 1 for ``normal``, 1/√12 for ``uniform``); with ``a = None`` it is zero-mean;
* a snapshot with ``kappa == 0`` leaves the parameters untouched, bit for bit;
* removing δ gives back the clean weights up to float rounding (``W + δ − δ`` is rounded twice): where the exact
  bits matter, :meth:`~ParamNoise.clean_exact` puts back copies taken before, and :meth:`~ParamNoise.rounding_residual`
  with :meth:`~ParamNoise.restore_residual` rebuild ``W + δ`` bit for bit from the clean weights (a resume).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .noise_source import NoiseSource

__all__ = ["NoiseSnapshot", "ParamNoise"]


@dataclass
class NoiseSnapshot:
    """The noise of one step inside the parameters: ``δ_i = a_i + b_i ⊙ ε(step, i)``.

    ``a_i`` (``None``: no offset) and ``b_i`` are per-output-channel coefficients already laid out for parameter
    ``i`` (see :meth:`ParamNoise.snapshot`); ``kappa`` is the noise scale they include (0: no noise at all).
    """

    step: int
    kappa: float
    a: list[Tensor | None]
    b: list[Tensor]

    def to(self, device: torch.device) -> NoiseSnapshot:
        return NoiseSnapshot(self.step, self.kappa, [None if t is None else t.to(device) for t in self.a], [t.to(device) for t in self.b])


class ParamNoise:
    """Adds, moves and removes per-step noise in place in ``params`` (see the module docstring for the promises).

    Args:
        params: the noisy tensors (``nn.Parameter`` or any tensor), output channels along dim 0; each is updated
            through ``.data`` in place. Index ``i`` in this list keys the noise of ``params[i]``.
        source: the standard noise ε (exact generator or pool), regenerated from ``(step, i)``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(3, 4))
        >>> engine = ParamNoise([w], NoiseSource("generator", "normal", seed=0))
        >>> snap = engine.snapshot(step=5, kappa=1.0, coefficients=[(None, torch.full((3,), 0.1))], device=w.device)
        >>> engine.put(snap)
        >>> torch.equal(w.detach(), engine.noise(0))  # δ is regenerated, not stored
        True
        >>> engine.remove()
        >>> bool(w.abs().max() < 1e-6), engine.applied is None
        (True, True)
    """

    def __init__(self, params: Sequence[Tensor], source: NoiseSource) -> None:
        self.params: list[Tensor] = list(params)
        self.source = source
        #: the snapshot whose noise the parameters hold now (``None``: they are clean)
        self.applied: NoiseSnapshot | None = None
        #: some noise (``kappa > 0``) was added to the parameters since this engine was built (or since the
        #: owner last reset the flag)
        self.noised = False

    # snapshots --------------------------------------------------------------------------------------------
    def snapshot(
        self, step: int, kappa: float, coefficients: Sequence[tuple[Tensor | None, Tensor]], device: torch.device
    ) -> NoiseSnapshot:
        """The snapshot of ``step`` from one ``(a, b)`` pair of per-output-channel vectors per parameter (``a``
        may be ``None``), moved to ``device`` in each parameter's dtype and shaped to broadcast over it."""
        a: list[Tensor | None] = []
        b: list[Tensor] = []
        for p, (a_n, b_n) in zip(self.params, coefficients):
            shape = (-1,) + (1,) * (p.dim() - 1) if not p.is_contiguous() else (-1, 1)
            a.append(None if a_n is None else a_n.to(device, p.dtype).reshape(shape))
            b.append(b_n.to(device, p.dtype).reshape(shape))
        return NoiseSnapshot(step, kappa, a, b)

    # the in-place updates ---------------------------------------------------------------------------------
    @staticmethod
    def _target(p: Tensor) -> Tensor:
        """What the updates write: a contiguous parameter as ``(channels, -1)`` rows (noise served in row chunks),
        any other as it is."""
        return p.data.view(p.shape[0], -1) if p.is_contiguous() else p.data

    @torch.no_grad()
    def add(self, snap: NoiseSnapshot, sign: float, into: dict[int, Tensor] | None = None) -> None:
        """``tensor += sign · δ(snap)`` for every parameter, or only for the tensors in ``into`` (parameter index →
        a tensor shaped like that parameter). Does not change :attr:`applied`."""
        if snap.kappa == 0.0:
            return
        if into is None and sign > 0:
            self.noised = True
        src = self.source
        items = into.items() if into is not None else enumerate(self.params)
        for i, p in items:
            t = self._target(p)
            if t.dim() == 2:
                for r0, r1, eps in src.chunks((snap.step, i), t.shape[0], t.shape[1], p.device, p.dtype):
                    t[r0:r1].addcmul_(snap.b[i][r0:r1], eps, value=sign)
            else:
                t.addcmul_(snap.b[i], src.full((snap.step, i), t.shape, p.device, p.dtype), value=sign)
            if snap.a[i] is not None:
                t.add_(snap.a[i], alpha=sign)

    @torch.no_grad()
    def swap(self, new: NoiseSnapshot, old: NoiseSnapshot) -> None:
        """``params += δ(new) − δ(old)`` in one pass per parameter (the differential increment). Does not change
        :attr:`applied`."""
        if old.kappa == 0.0:
            return self.add(new, 1.0)
        if new.kappa == 0.0:
            return self.add(old, -1.0)
        self.noised = True
        src = self.source
        for i, p in enumerate(self.params):
            t = self._target(p)
            if t.dim() == 2:
                rows, cols = t.shape
                for (r0, r1, e_new), (s0, s1, e_old) in zip(
                    src.chunks((new.step, i), rows, cols, p.device, p.dtype),
                    src.chunks((old.step, i), rows, cols, p.device, p.dtype),
                ):
                    t[r0:r1].addcmul_(new.b[i][r0:r1], e_new).addcmul_(old.b[i][s0:s1], e_old, value=-1.0)
            else:
                t.addcmul_(new.b[i], src.full((new.step, i), t.shape, p.device, p.dtype))
                t.addcmul_(old.b[i], src.full((old.step, i), t.shape, p.device, p.dtype), value=-1.0)
            if new.a[i] is not None and not (new.a[i] is old.a[i] and new.kappa == old.kappa):
                t.add_(new.a[i]).sub_(old.a[i])

    def put(self, snap: NoiseSnapshot) -> None:
        """Add ``δ(snap)`` to the parameters (which hold no noise) and record it as :attr:`applied`."""
        self.add(snap, 1.0)
        self.applied = snap

    def move_to(self, snap: NoiseSnapshot) -> None:
        """From whatever noise the parameters hold to ``δ(snap)``: :meth:`put` when clean, else :meth:`swap`."""
        if self.applied is None:
            self.add(snap, 1.0)
        else:
            self.swap(snap, self.applied)
        self.applied = snap

    def remove(self) -> None:
        """Take the applied noise out (up to float rounding); nothing when the parameters are clean."""
        if self.applied is not None:
            self.add(self.applied, -1.0)
            self.applied = None

    @contextlib.contextmanager
    def clean(self) -> Iterator[None]:
        """Inside the block the parameters hold the clean weights; the noise is added back afterwards."""
        snap = self.applied
        self.remove()
        try:
            yield
        finally:
            if snap is not None:
                self.add(snap, 1.0)
                self.applied = snap

    @contextlib.contextmanager
    def clean_exact(self) -> Iterator[None]:
        """As :meth:`clean`, but afterwards every parameter is the exact copy taken before (bit for bit), not
        ``W + δ − δ + δ``: for work that must not change the run, e.g. statistics gathered for a checkpoint."""
        saved = [p.detach().clone() for p in self.params]
        snap = self.applied
        try:
            self.remove()
            yield
        finally:
            for p, v in zip(self.params, saved):
                p.data.copy_(v)
            self.applied = snap

    # reading the noise back -------------------------------------------------------------------------------
    def noise(self, i: int) -> Tensor | None:
        """``δ`` currently inside ``params[i]``, regenerated (``None`` when the parameters are clean or κ = 0)."""
        snap = self.applied
        if snap is None or snap.kappa == 0.0:
            return None
        delta = torch.zeros_like(self.params[i])
        self.add(snap, 1.0, into={i: delta})
        return delta

    @torch.no_grad()
    def rounding_residual(self, snap: NoiseSnapshot) -> list[tuple[Tensor, Tensor]]:
        """Per parameter, the elements where re-applying δ to the clean weight (``W + δ − δ``, float rounded)
        would not give back the current ``W + δ`` bit for bit: their flat indices and exact values (on the CPU).
        :meth:`restore_residual` writes them back, so a resume continues exactly (usually a small fraction of the
        elements)."""
        out = []
        for i, p in enumerate(self.params):
            delta = torch.zeros_like(p)
            self.add(snap, 1.0, into={i: delta})
            sim = p.detach().clone().sub_(delta)  # the clean weight a checkpoint holds
            self.add(snap, 1.0, into={i: sim})  # what the resume re-applies
            idx = (sim != p.detach()).reshape(-1).nonzero().squeeze(1)
            out.append((idx.cpu(), p.detach().reshape(-1)[idx].cpu()))
        return out

    def restore_residual(self, residual: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Write the exact values of :meth:`rounding_residual` back into the parameters (after :meth:`put` of the
        same snapshot on the clean weights). A residual of another parameter list (other length, an index out of
        range, mismatched sizes) is ignored, entry by entry."""
        if len(residual) != len(self.params):
            return
        for (idx, vals), p in zip(residual, self.params):
            if idx.numel() and vals.numel() == idx.numel() and int(idx.max()) < p.numel():
                flat = p.data.reshape(-1).clone()
                flat[idx.to(p.device)] = vals.to(p.device, p.dtype)
                p.data.copy_(flat.view(p.shape))
