"""SharpnessMonitor: log the Hessian trace and top eigenvalue of the training loss every N epochs."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ...quant.hooks import hooks_suspended
from ..group import flatten_callbacks
from ..weight_noise import DifferentialNoiseInjection
from .hessian import hessian_trace, top_eigenvalue
from .loss import LossFn, classification_loss

__all__ = ["SharpnessMonitor"]


def _to_cpu(batch: Any) -> Any:
    """A detached CPU copy of a (nested) batch, independent of later in-place changes to the original."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().to("cpu", copy=True)
    if isinstance(batch, Mapping):
        return {k: _to_cpu(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_cpu(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_cpu(v) for v in batch)
    return batch


class SharpnessMonitor(Callback):
    """Every ``every_n_epochs`` training epochs, log ``sharpness/hessian_trace`` and ``sharpness/top_eig``.

    The measurement uses a fixed set of batches: the first ``n_batches`` training batches the callback sees
    (captured in ``on_train_batch_start`` of the first epoch, i.e. as ``training_step`` receives them after the
    device transfer and ``on_after_batch_transfer``; kept on CPU and moved to the model's device for each
    measurement). The probes use a fixed ``seed``, so successive values differ only through the weights.

    It runs in ``on_train_epoch_end``, after that epoch's validation, with the model in eval mode (BatchNorm on
    running statistics) and on *clean* weights: pass the weight-noise owner as ``weight_noise`` (a
    :class:`~flatq_lightning.DNQ` or a :class:`~flatq_lightning.DifferentialNoiseInjection`) and its
    ``clean_weights()`` is entered for the duration of the measurement, so injected weight noise is removed and
    put back afterwards. Without it the current weights are measured (a warning says so when the Trainer has
    weight noise). The recorder and activation-noise hooks are suspended meanwhile, so neither
    the recorded statistics nor the measured loss see the measurement's forwards as training. No gradient is left in ``param.grad`` and the parameters are unchanged.

    Cost per measurement: ``n_batches · (n_probes + power_iters)`` forward + double-backward passes. Under
    ``bf16-mixed`` the measurement runs in float32 (outside the training autocast). Under DDP every rank
    measures its own batches and the logged value is their mean (``sync_dist=True``). After a resume the batch
    set is re-captured from the first batches after the restart.

    Args:
        every_n_epochs: measure at the end of every N-th training epoch.
        n_batches: number of cached batches.
        n_probes: Rademacher probes per batch for the Hutchinson trace.
        power_iters: maximum power iterations for the top eigenvalue.
        loss_fn: ``loss_fn(module, batch) -> scalar``; default :func:`flatq_lightning.callbacks.flatness.loss.classification_loss`
            (cross-entropy of ``module(x)`` for ``(x, y)`` batches). Use a module-level function (picklable).
        tol: relative tolerance ending the power iteration.
        seed: seed of the probes and the power-iteration start.
        weight_noise: the callback whose ``clean_weights()`` removes the training noise while measuring.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(max_epochs=10, callbacks=[SharpnessMonitor(every_n_epochs=5)])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        n_batches: int = 2,
        n_probes: int = 4,
        power_iters: int = 10,
        loss_fn: LossFn | None = None,
        tol: float = 1e-3,
        seed: int = 0,
        weight_noise: Any = None,
    ) -> None:
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("n_batches", n_batches),
            ("n_probes", n_probes),
            ("power_iters", power_iters),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SharpnessMonitor: {name} must be a positive int, got {value!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"SharpnessMonitor: loss_fn must be callable(module, batch) or None, got {loss_fn!r}"
            )
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"SharpnessMonitor: tol must be a number >= 0, got {tol!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SharpnessMonitor: seed must be an int, got {seed!r}")
        if weight_noise is not None and not callable(getattr(weight_noise, "clean_weights", None)):
            raise ValueError(
                "SharpnessMonitor: weight_noise must be a DNQ or a DifferentialNoiseInjection (it removes the "
                f"training noise while measuring), got {type(weight_noise).__name__}"
            )
        self.weight_noise = weight_noise
        self.every_n_epochs = every_n_epochs
        self.n_batches = n_batches
        self.n_probes = n_probes
        self.power_iters = power_iters
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else classification_loss
        self.tol = float(tol)
        self.seed = seed
        self.epochs_seen = 0
        self.history: list[dict[str, float]] = []
        self._batches: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, n_batches=self.n_batches, n_probes=self.n_probes
        )

    # --------------------------------------------------------------------------------------- hooks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if len(self._batches) < self.n_batches:
            self._batches.append(_to_cpu(batch))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs_seen += 1
        if self.epochs_seen % self.every_n_epochs != 0 or not self._batches:
            return
        trace, eig = self.measure(trainer, pl_module)
        self.history.append({"epoch": float(trainer.current_epoch), "hessian_trace": trace, "top_eig": eig})
        pl_module.log_dict(
            {"sharpness/hessian_trace": trace, "sharpness/top_eig": eig},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )

    # ------------------------------------------------------------------------------------- measure
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.weight_noise is not None:
            return

        if any(isinstance(c, DifferentialNoiseInjection) and c.active for c in flatten_callbacks(trainer.callbacks)):
            rank_zero_warn(
                "SharpnessMonitor will measure the noisy weights W + δ: pass SharpnessMonitor(weight_noise=<the DNQ>) "
                "to measure the clean ones"
            )

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[float, float]:
        """Hessian trace and top eigenvalue on the cached batches and clean weights (eval mode)."""
        with contextlib.ExitStack() as stack:
            if self.weight_noise is not None:
                stack.enter_context(self.weight_noise.clean_weights())
            stack.enter_context(hooks_suspended())  # no recorder/activation-noise hook fires while measuring
            trace = hessian_trace(
                pl_module, self.loss_fn, self._batches, n_probes=self.n_probes, seed=self.seed
            )
            eig = top_eigenvalue(
                pl_module, self.loss_fn, self._batches, iters=self.power_iters, tol=self.tol, seed=self.seed
            )
        return trace, eig

    # ---------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"epochs_seen": self.epochs_seen, "history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs_seen = int(state_dict.get("epochs_seen", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]
