"""Settings and hyperparameters to Lightning's loggers: one merged set per logger, held for Lightning's own first
``log_hyperparams`` call when there is one to come (what TensorBoard's HPARAMS view reads)."""

from __future__ import annotations

from typing import Any

__all__ = ["describe", "log_every_n_steps", "log_hyperparams", "log_settings"]


def log_hyperparams(logger: Any, settings: dict[str, Any]) -> None:
    """Add ``settings`` to a Lightning logger's hyperparameters, sent together with the ones it already has.

    Each call sends the merged set (the model's and data module's, the callbacks' settings), so that a logger
    that keeps only one set keeps them all; CSV and other loggers merge either way. TensorBoard's HPARAMS view
    reads the first set of a run: the callbacks' settings known at fit start go out with Lightning's own call
    (:func:`log_settings`).
    """
    known = getattr(logger, "hparams", None)
    merged = {**known, **settings} if isinstance(known, dict) else dict(settings)
    logger.log_hyperparams(merged)


def describe(value: object) -> object:
    """A logger-friendly hyperparameter: numbers, strings and bools as they are, anything else as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return ",".join(str(v) for v in value)
    return repr(value)


#: the hooks that run before Lightning logs the module's and data module's hyperparameters (``Trainer._run``:
#: setup, configure_model, on_fit_start, then ``_log_hyperparams``)
_BEFORE_AUTOLOG = ("setup", "configure_model", "on_fit_start")


def _autolog_pending(trainer: object) -> bool:
    """Whether Lightning is still to log the module's/data module's hyperparameters in this run: a callback is
    in one of the hooks before that call, and the Trainer and the module (or the data module) let it log."""
    if not getattr(trainer, "enable_autolog_hparams", True):
        return False
    module = getattr(trainer, "lightning_module", None)
    if module is None or getattr(module, "_current_fx_name", None) not in _BEFORE_AUTOLOG:
        return False
    dm = getattr(trainer, "datamodule", None)
    return bool(getattr(module, "_log_hyperparams", True) or getattr(dm, "_log_hyperparams", False))


def _hold(logger: Any, settings: dict[str, object]) -> None:
    """Keep ``settings`` for ``logger``'s next ``log_hyperparams`` call (Lightning's own, at fit start): that one
    call then sends the module's hyperparameters and every callback's settings together."""
    pending = logger.__dict__.get("_flatq_pending_settings")
    if pending is None:
        pending = {}
        before = logger.__dict__.get("log_hyperparams")  # an instance attribute someone else set, else None
        send = logger.log_hyperparams

        def log_hyperparams(params: Any, *args: Any, **kwargs: Any) -> Any:
            from lightning.fabric.utilities.logger import _convert_params

            if before is None:
                del logger.log_hyperparams  # back to the class's method: this runs once
            else:
                logger.log_hyperparams = before
            held = logger.__dict__.pop("_flatq_pending_settings", {})
            return send({**(_convert_params(params) or {}), **held}, *args, **kwargs)

        logger.log_hyperparams = log_hyperparams
        logger.__dict__["_flatq_pending_settings"] = pending
    pending.update(settings)


def log_settings(trainer: object, settings: dict[str, object]) -> None:
    """Add ``settings`` to every logger's hyperparameters (each logger writes on rank zero only).

    From the hooks before Lightning logs the module's hyperparameters (``setup``, ``on_fit_start``), the settings
    are held and go out with Lightning's own ``log_hyperparams`` call: one write holds the module's, the data
    module's and every callback's settings, which is what TensorBoard's HPARAMS view shows (it reads the first
    hyperparameter summary of a run only). Later, or when Lightning does not log hyperparameters
    (``enable_autolog_hparams=False``, ``save_hyperparameters(logger=False)``), the merged set is sent at once;
    CSV and the other loggers merge it into what they have.
    """
    hold = _autolog_pending(trainer)
    for logger in getattr(trainer, "loggers", None) or []:
        if hold:
            try:
                _hold(logger, settings)
                continue
            except (AttributeError, TypeError):  # a logger that takes no instance attributes: write now
                pass
        log_hyperparams(logger, settings)


def log_every_n_steps(trainer: object, step: int) -> bool:
    """Whether ``step`` is one the Trainer writes logs on (Lightning's rule: ``(step + 1) % log_every_n_steps
    == 0``): per-step values are logged only then, so that logging a Python number costs no host-device copy
    on the other steps."""
    n = int(getattr(trainer, "log_every_n_steps", 1) or 1)
    return (step + 1) % n == 0
