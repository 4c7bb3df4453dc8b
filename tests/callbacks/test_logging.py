"""The method's settings and state reach the Lightning loggers: DNQ/PTQ hyperparameters, κ_t and the warm-up
state per logged step, per-layer PTQ SQNR, and the PTQ plot for loggers that take images."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger

from flatq_lightning import PostTrainingQuantization, PTQReport, dnq_callbacks
from flatq_lightning.ptq.report import LayerSQNR, PTQRow
from tests.callbacks.lm import TinyLM, loaders, trainer

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


class _HParamsLM(TinyLM):
    """TinyLM with hyperparameters of its own (``save_hyperparameters``), as most modules have."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__(lr=lr, momentum=momentum)
        self.save_hyperparameters()


def _fit(logger: Any, tmp_path, steps: int = 6, module: Any = None, **trainer_kw: Any) -> PostTrainingQuantization:
    ptq = PostTrainingQuantization(bits=("w8a8", "w4a4"), calib_batches=1, progress=False, print_report=False)
    cbs = [*dnq_callbacks("w4a4", warmup_steps=2, stats_every=2, p=0.5), ptq]
    train, val = loaders(n=steps * 32)
    tr = trainer(tmp_path, logger=logger, callbacks=cbs, log_every_n_steps=1, limit_val_batches=1, **trainer_kw)
    tr.fit(module if module is not None else TinyLM(), train_dataloaders=train, val_dataloaders=val)
    return ptq


def test_settings_state_and_ptq_results_reach_a_csv_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    ptq = _fit(logger, tmp_path)
    hp = yaml.safe_load((tmp_path / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hp["dnq/preset"] == "w4a4" and hp["dnq/stats_every"] == 2 and hp["dnq/momentum"] == 0.9
    assert hp["dnq/weight_noise/mode"] == "differential" and hp["dnq/weight_noise/warmup_steps"] == 2
    assert hp["dnq/weight_noise/noise_scale"] == 1.0 and hp["dnq/act_noise/p"] == 0.5
    assert hp["ptq/bits"] == "w8a8,w4a4" and hp["ptq/observer"] == "minmax" and hp["ptq/stage"] == "validate"
    assert hp["ptq/calib_batches"] == 1 and hp["ptq/kept_8bit"] == "conv1,fc"

    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    per_step = {int(r["step"]): r for r in rows if r.get("dnq/kappa")}
    assert sorted(per_step) == list(range(6))
    assert [float(per_step[s]["dnq/kappa"]) for s in range(6)] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert [float(per_step[s]["dnq/warmup"]) for s in range(6)] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert [float(per_step[s]["dnq/act_kappa"]) for s in range(6)] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    logged = {k: float(v) for r in rows for k, v in r.items() if v not in ("", None) and k.startswith("ptq/") and "sqnr_db" in k}
    layer = ptq.report.row("w4a4").layers[1]
    assert logged[f"ptq/w4a4/sqnr_db/{layer.name}/weight"] == pytest.approx(layer.weight_sqnr_db, rel=1e-5)
    assert logged[f"ptq/w4a4/sqnr_db/{layer.name}/act"] == pytest.approx(layer.act_sqnr_db, rel=1e-5)
    assert len(logged) == 2 * sum(1 for r in ptq.report.rows for _ in r.layers)


def test_kappa_is_logged_only_on_logging_steps(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    cbs = dnq_callbacks("w4a4", stats_every=2, warmup_steps=3)
    train, _ = loaders(n=6 * 32)
    tr = trainer(tmp_path, logger=logger, callbacks=cbs, log_every_n_steps=3, limit_val_batches=0)
    tr.fit(TinyLM(), train_dataloaders=train)
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    kappa = {int(r["step"]): float(r["dnq/kappa"]) for r in rows if r.get("dnq/kappa")}
    assert kappa == {2: 0.0, 5: 1.0}  # Lightning's logging steps; step 2 is still in the warm-up


class _ImageLogger(Logger):
    """A logger with ``log_image`` (the W&B / Neptune style API)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, Any, int | None]] = []
        self.metrics: dict[str, float] = {}
        self.hparams: dict[str, Any] = {}

    name = "images"
    version = 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self.images += [(key, im, step) for im in images]


def test_log_to_sends_the_plot_to_loggers_that_take_images():
    rep = PTQReport(fp_top1=90.0, fp_top5=99.0, rows=[
        PTQRow("w4a4", 4, 4, 80.0, 97.0, 10.0, 2.0, [LayerSQNR("conv", 4, 4, 15.0, float("inf"))])])
    lg = _ImageLogger()
    rep.log_to([lg], step=7)
    (key, image, step), = lg.images
    assert key == "ptq/accuracy" and step == 7 and image.ndim == 3 and image.shape[2] == 3
    assert lg.metrics == {"ptq/fp/top1": 90.0, "ptq/fp/top5": 99.0, "ptq/w4a4/top1": 80.0, "ptq/w4a4/top5": 97.0,
                          "ptq/w4a4/sqnr_db/conv/weight": 15.0}  # the infinite SQNR is left out
    assert lg.hparams["ptq/bits"] == "w4a4"


class _CallsLogger(Logger):
    """Keeps every ``log_hyperparams`` call, in order."""

    name = "calls"
    version = 0

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append(dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def _all_kinds(hparams: dict[str, Any]) -> bool:
    """The module's, the DNQ callbacks' and the PTQ callback's keys, all in ``hparams``."""
    return {"lr", "momentum", "dnq/preset", "dnq/weight_noise/mode", "dnq/act_noise/p", "ptq/bits", "ptq/observer"} <= set(hparams)


@pytest.mark.parametrize("autolog", [True, False])
def test_the_first_hyperparameter_set_holds_the_module_and_every_callback(tmp_path, autolog):
    # the callbacks' settings ride with Lightning's own log_hyperparams call at fit start: the first set a logger
    # gets (the one TensorBoard's HPARAMS shows) is complete; without Lightning's call they are still sent
    logger = _CallsLogger()
    _fit(logger, tmp_path, steps=2, module=_HParamsLM(lr=0.02), enable_autolog_hparams=autolog)
    first = logger.calls[0]
    if autolog:
        assert _all_kinds(first) and first["lr"] == 0.02 and first["dnq/preset"] == "w4a4"
        assert first["ptq/bits"] == "w8a8,w4a4" and first["dnq/weight_noise/warmup_steps"] == 2
    else:  # no module hyperparameters from Lightning: the settings, each merged with what was sent before
        assert "lr" not in first and {"dnq/preset", "ptq/bits"} <= set().union(*logger.calls)
    assert "log_hyperparams" not in vars(logger) and "_flatq_pending_settings" not in vars(logger)  # nothing left


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
def test_tensorboard_gets_scalars_hyperparameters_and_the_ptq_plot(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    ptq = _fit(logger, tmp_path, module=_HParamsLM(lr=0.02))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "ptq/accuracy" in tags["images"]
    assert {"dnq/kappa", "dnq/warmup", "ptq/w4a4/top1"} <= set(tags["scalars"])
    assert [e.value for e in acc.Scalars("dnq/kappa")][:3] == [0.0, 0.0, 1.0]
    assert acc.Scalars("ptq/w4a4/top1")[-1].value == pytest.approx(ptq.report.row("w4a4").top1)
    assert logger.hparams["dnq/preset"] == "w4a4" and logger.hparams["ptq/bits"] == "w8a8,w4a4"
    # the hparams summaries (TensorBoard's HPARAMS tab) in the event file carry the DNQ and PTQ settings
    events = b"".join(p.read_bytes() for p in Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert b"dnq/weight_noise/mode" in events and b"ptq/observer" in events and b"dnq/act_noise/p" in events
    # TensorBoard's HPARAMS view: the run's session is its first hparams summary (later ones are ignored); it
    # holds the module's hyperparameters and the DNQ and PTQ settings together
    from tensorboard.plugins.hparams import metadata as hp_metadata

    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.SummaryMetadata(hp_metadata.SESSION_START_INFO_TAG).plugin_data.content
    session = hp_metadata.parse_session_start_info_plugin_data(content).hparams
    assert _all_kinds(session), sorted(session)
    assert session["lr"].number_value == 0.02 and session["dnq/preset"].string_value == "w4a4"
    assert session["ptq/bits"].string_value == "w8a8,w4a4" and session["dnq/act_noise/p"].number_value == 0.5
