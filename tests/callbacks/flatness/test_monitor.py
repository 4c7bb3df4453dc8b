"""SharpnessMonitor inside a real Trainer: metrics in the CSV log, clean weights, state."""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning.callbacks.flatness import SharpnessMonitor, classification_loss, hessian_trace
from tests.helpers import SmallConvNet, blob_data


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallConvNet(width=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class FakeNoise(Callback):
    """Keeps a large perturbation in the weights during training; clean_weights() removes it temporarily."""

    def __init__(self) -> None:
        self.delta: dict[str, torch.Tensor] = {}
        self.inside = False
        self.entered = 0

    def on_train_start(self, trainer, pl_module):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                self.delta[name] = torch.randn(p.shape, generator=g) * 5.0
                p.add_(self.delta[name])

    @contextlib.contextmanager
    def clean_weights(self) -> Iterator[None]:
        self.entered += 1
        params = dict(self.pl_module.named_parameters())
        with torch.no_grad():
            for name, d in self.delta.items():
                params[name].sub_(d)
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
            with torch.no_grad():
                for name, d in self.delta.items():
                    params[name].add_(d)

    def setup(self, trainer, pl_module, stage):
        self.pl_module = pl_module


def loader(n: int = 64) -> DataLoader:
    x, y = blob_data(n)
    return DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def trainer(tmp_path, callbacks, max_epochs=2, logger=None) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def test_metrics_appear_in_csv_log(tmp_path):
    logger = CSVLogger(tmp_path, name="sharp")
    monitor = SharpnessMonitor(n_batches=2, n_probes=2, power_iters=4)
    module = TinyModule()
    trainer(tmp_path, [monitor], logger=logger).fit(module, loader())
    rows = read_metrics(logger)
    traces = [float(r["sharpness/hessian_trace"]) for r in rows if r.get("sharpness/hessian_trace")]
    eigs = [float(r["sharpness/top_eig"]) for r in rows if r.get("sharpness/top_eig")]
    assert len(traces) == 2 and len(eigs) == 2
    assert all(math.isfinite(v) for v in traces + eigs)
    assert all(e > 0 for e in eigs)
    assert monitor.epochs_seen == 2 and [h["epoch"] for h in monitor.history] == [0.0, 1.0]
    assert len(monitor._batches) == 2 and all(b[0].device.type == "cpu" for b in monitor._batches)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())
    assert module.training


def test_every_n_epochs_and_state_dict(tmp_path):
    monitor = SharpnessMonitor(every_n_epochs=2, n_batches=1, n_probes=1, power_iters=2)
    trainer(tmp_path, [monitor], max_epochs=3).fit(TinyModule(), loader(32))
    assert monitor.epochs_seen == 3 and len(monitor.history) == 1
    restored = SharpnessMonitor(every_n_epochs=2, n_batches=1, n_probes=1, power_iters=2)
    restored.load_state_dict(monitor.state_dict())
    assert restored.epochs_seen == 3 and restored.history == monitor.history
    assert "SharpnessMonitor" in monitor.state_key and monitor.state_key != SharpnessMonitor().state_key


def test_measures_on_clean_weights(tmp_path):
    noise = FakeNoise()
    seen_inside: list[bool] = []

    def loss_fn(model, batch):
        seen_inside.append(noise.inside)
        return classification_loss(model, batch)

    monitor = SharpnessMonitor(n_batches=1, n_probes=1, power_iters=2, loss_fn=loss_fn, weight_noise=noise)
    module = TinyModule()
    trainer(tmp_path, [noise, monitor], max_epochs=1).fit(module, loader(32))
    assert noise.entered == 1 and seen_inside and all(seen_inside)
    # the logged value is the clean model's: recompute with the noise removed
    with noise.clean_weights():
        before = {k: v.clone() for k, v in module.state_dict().items()}
        ref = hessian_trace(module, classification_loss, monitor._batches, n_probes=1, seed=0)
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert monitor.history[0]["hessian_trace"] == pytest.approx(ref, rel=1e-6)
    noisy = hessian_trace(module, classification_loss, monitor._batches, n_probes=1, seed=0)
    assert noisy != pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"every_n_epochs": 0}, "every_n_epochs must be a positive int"),
        ({"n_batches": 1.5}, "n_batches must be a positive int"),
        ({"n_probes": -1}, "n_probes must be a positive int"),
        ({"power_iters": True}, "power_iters must be a positive int"),
        ({"loss_fn": 3}, "loss_fn must be callable"),
        ({"tol": -1.0}, "tol must be a number >= 0"),
        ({"seed": "a"}, "seed must be an int"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessMonitor(**kwargs)


def test_with_real_differential_noise_measures_clean_weights(tmp_path):
    from flatq_lightning.callbacks import DifferentialNoiseInjection, dnq_callbacks

    cbs = dnq_callbacks("w4a4", noise_scale=1.0, stats_every=2)
    noise = next(c for c in cbs if isinstance(c, DifferentialNoiseInjection))
    with pytest.warns(UserWarning, match="measure the noisy weights"):  # not told which callback holds the noise
        trainer(tmp_path, [*dnq_callbacks("w4a4"), SharpnessMonitor(n_batches=1)], max_epochs=1).fit(
            TinyModule(), loader(8)
        )
    monitor = SharpnessMonitor(n_batches=1, n_probes=1, power_iters=2, weight_noise=noise)
    module = TinyModule()
    trainer(tmp_path, [*cbs, monitor], max_epochs=1).fit(module, loader(32))
    # on_train_end removed the noise: the model now holds the clean weights the monitor measured; it also
    # re-estimated the BN statistics on them, while the monitor measured (at epoch end) with those of training
    from flatq_lightning.quant import load_bn_state

    load_bn_state(module, noise.noisy_bn_state)
    ref = hessian_trace(module, classification_loss, monitor._batches, n_probes=1, seed=0)
    assert monitor.history[0]["hessian_trace"] == pytest.approx(ref, rel=1e-5)
    assert noise._applied is None
