"""Sharpness-Aware Minimization (Foret et al. 2021, "SAM") and its adaptive variant (ASAM, Kwon et al. 2021).

The flatness baseline the DNQ pre-conditioning is compared against. :class:`SAM` wraps any
``torch.optim.Optimizer`` class and works with Lightning's automatic optimization, which passes a closure that
runs ``training_step`` and backward::

    def configure_optimizers(self):
        opt = SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return [opt], [sched]

From a Hydra config: ``_target_: flatq_lightning.SAM``, ``_partial_: true``, ``base_optimizer_cls: torch.optim.SGD``
(a dotted path or a ``torch.optim`` class name is resolved), ``rho: 0.05``, ``lr: 0.1``, ``momentum: 0.9``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim import Optimizer

__all__ = ["SAM", "frozen_running_stats"]


@contextlib.contextmanager
def frozen_running_stats() -> Iterator[None]:
    """Inside the block, no normalization layer keeps the running statistics its training forwards write.

    A global forward pre-hook snapshots ``running_mean``/``running_var``/``num_batches_tracked`` of every
    BatchNorm-like module (``_NormBase`` with ``track_running_stats``) the first time it runs in train mode inside
    the block; on exit they are copied back bit for bit. SAM uses it around its second forward/backward pass so
    each optimizer step updates the running statistics once, as plain training does. (Modules whose forward is
    compiled by ``torch.compile`` may not fire global hooks.)

    Example:
        >>> bn = nn.BatchNorm1d(3).train()
        >>> with frozen_running_stats():
        ...     _ = bn(torch.randn(8, 3))
        >>> bool(bn.running_mean.eq(0).all()), int(bn.num_batches_tracked)
        (True, 0)
    """
    saved: dict[int, tuple[nn.Module, list[tuple[str, Tensor]]]] = {}

    def pre_hook(module: nn.Module, args: Any) -> None:
        if (
            isinstance(module, _NormBase)
            and module.training
            and module.track_running_stats
            and id(module) not in saved
        ):
            bufs = [
                (name, buf.detach().clone())
                for name in ("running_mean", "running_var", "num_batches_tracked")
                if isinstance(buf := getattr(module, name, None), Tensor)
            ]
            saved[id(module)] = (module, bufs)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for module, bufs in saved.values():
                for name, value in bufs:
                    getattr(module, name).copy_(value)


def _resolve_optimizer_cls(cls: type[Optimizer] | str) -> type[Optimizer]:
    if isinstance(cls, str):
        if "." in cls:
            mod_name, _, attr = cls.rpartition(".")
            try:
                cls = getattr(importlib.import_module(mod_name), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"base_optimizer_cls {cls!r}: cannot import it ({err})") from err
        elif hasattr(torch.optim, cls):
            cls = getattr(torch.optim, cls)
        else:
            raise ValueError(
                f"base_optimizer_cls {cls!r} is not a torch.optim class; give a dotted path such as "
                "'torch.optim.SGD' or a class"
            )
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError(f"base_optimizer_cls must be a torch.optim.Optimizer subclass, got {cls!r}")
    if issubclass(cls, SAM):
        raise TypeError("base_optimizer_cls cannot be SAM itself")
    return cls


class SAM(Optimizer):
    """Sharpness-Aware Minimization around any base optimizer: ``w ← base_step(w, ∇L(w + e(w)))``.

    ``step(closure)`` needs a closure that recomputes the loss and its gradients (``zero_grad`` is optional:
    SAM zeroes before the second call). Lightning's automatic optimization provides exactly that:

    1. first closure call: gradients g at w (the returned loss is this one);
    2. e = ρ·g/‖g‖ (ASAM, ``adaptive=True``: e = ρ·w²⊙g/‖w⊙g‖), w ← w + e; the norm is global over all
       groups and computed in float32, so bf16 gradients are safe;
    3. gradients zeroed, second closure call: gradients at w + e, with BatchNorm running statistics frozen
       (see :func:`frozen_running_stats`) so they are updated once per step, like plain training;
    4. w restored bit for bit from a copy, base optimizer step with the w + e gradients.

    ``param_groups`` and ``state`` are the base optimizer's own objects, so LR schedulers (CosineAnnealingLR,
    OneCycleLR with momentum cycling, …) and Lightning's device moves and checkpoints act on the base optimizer;
    ``state_dict``/``load_state_dict`` are the base optimizer's. Groups also hold ``rho`` and ``adaptive``, so
    both can differ per group.

    Costs two forward/backward passes and one copy of the parameters per step. Caveats under Lightning: the
    training step (and its ``self.log`` calls) and ``on_before_optimizer_step``/gradient clipping run twice per
    step (epoch-mean train losses thus mix w and w + e losses); with ``accumulate_grad_batches > 1`` the second
    pass sees only the last micro-batch; ``precision="16-mixed"`` is not supported, because Lightning's
    GradScaler path calls ``step`` without a closure (use ``"bf16-mixed"`` or 32-bit).

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer_cls: the optimizer class (or a dotted path / ``torch.optim`` name) doing the update.
        rho: radius of the ascent step (0.05 is the paper's default for CIFAR; ASAM typically uses ~0.5-2).
        adaptive: ASAM's scale-invariant perturbation.
        **base_kwargs: forwarded to ``base_optimizer_cls`` (``lr``, ``momentum``, ``weight_decay``, ...).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> def closure():
        ...     loss = nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> opt.param_groups is opt.base_optimizer.param_groups
        True
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[Optimizer] | str,
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if (
            isinstance(rho, bool)
            or not isinstance(rho, (int, float))
            or not (rho >= 0 and math.isfinite(rho))
        ):
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
        base_cls = _resolve_optimizer_cls(base_optimizer_cls)
        super().__init__(params, dict(rho=float(rho), adaptive=adaptive, **base_kwargs))
        self.base_optimizer: Optimizer = base_cls(self.param_groups, **base_kwargs)
        # Share the group dicts and the state with the base optimizer (the base's add_param_group kept our
        # dicts and filled in its defaults): schedulers, checkpoints and device moves reach the base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._backup: dict[Tensor, Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:  # Optimizer's keeps only defaults/state/param_groups
        return self.__dict__.copy()

    # ------------------------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM and its base optimizer (e.g. when unfreezing layers during fine-tuning)."""
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups carry ``rho`` and ``adaptive`` too)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer and share its (new) groups and state again."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    # ------------------------------------------------------------------------------------------ steps
    def _params_with_grad(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    def _grad_norm(self) -> Tensor:
        """‖g‖ (ASAM: ‖|w|⊙g‖) over every group, in float32 on the first gradient's device."""
        norms = []
        device = None
        for group, p in self._params_with_grad():
            g = p.grad.detach().float()
            if group["adaptive"]:
                g = g * p.detach().float().abs()
            device = device or g.device
            norms.append(torch.linalg.vector_norm(g).to(device))
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Move w to w + e from the current gradients; returns False (and does nothing) if there are none.

        For manual optimization: ``loss.backward(); opt.first_step(zero_grad=True)``, second forward/backward
        (inside :func:`frozen_running_stats` if the model has BatchNorm), ``opt.second_step(zero_grad=True)``.
        """
        if self._backup:
            raise RuntimeError("SAM.first_step called twice without second_step in between")
        if not any(True for _ in self._params_with_grad()):
            return False
        norm = self._grad_norm()
        for group, p in self._params_with_grad():
            scale = group["rho"] / (norm.to(p.device) + 1e-12)
            e = p.grad.detach().float() * scale
            if group["adaptive"]:
                e = e * p.detach().float().square()
            self._backup[p] = p.detach().clone()
            p.add_(e.to(p.dtype))
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly and take the base optimizer's step with the gradients computed at w + e."""
        for p, w in self._backup.items():
            p.copy_(w)
        self._backup.clear()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step; ``closure`` (required) recomputes the loss and calls backward. Returns the loss at w."""
        if closure is None:
            raise RuntimeError(
                "SAM.step needs a closure that recomputes the loss and calls backward(): "
                "opt.step(closure). Under Lightning use automatic optimization with precision 32 or "
                "'bf16-mixed' ('16-mixed' calls step without a closure through its GradScaler)."
            )
        with torch.enable_grad():
            loss = closure()
        if not self.first_step(zero_grad=True):
            self.base_optimizer.step()  # no gradients (e.g. a skipped training_step): nothing to perturb
            return loss
        try:
            with torch.enable_grad(), frozen_running_stats():
                closure()
        except BaseException:
            for p, w in self._backup.items():  # never leave the weights perturbed
                p.copy_(w)
            self._backup.clear()
            raise
        self.second_step()
        return loss
