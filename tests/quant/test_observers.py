"""Range observers: one class serves the recorder during training and PTQ calibration."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import QuantErrorRecorder
from flatq_lightning.quant import QuantSpec, QuantTarget, make_observer, quantize_model, quantized_layers
from flatq_lightning.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver


def test_make_observer_follows_the_spec():
    for name, cls in (("minmax", MinMaxObserver), ("percentile", PercentileObserver), ("mse", MSEObserver)):
        assert type(make_observer(QuantSpec.activation(4, observer=name))) is cls


def test_ema_and_running_ranges():
    spec = QuantSpec.activation(8)
    ema, run = make_observer(spec, momentum=0.5), make_observer(spec)
    for x in (torch.tensor([-1.0, 1.0]), torch.tensor([-3.0, 2.0])):
        ema.update(x)
        run.update(x)
    assert ema.range() == (torch.tensor(-2.0), torch.tensor(1.5))
    assert run.range() == (torch.tensor(-3.0), torch.tensor(2.0))


def test_merged_does_not_change_the_observer_and_assign_does():
    obs = make_observer(QuantSpec.activation(8), momentum=0.9)
    obs.update(torch.tensor([0.0, 1.0]))
    lo, hi = obs.merged(*obs.batch_range(torch.tensor([0.0, 11.0])))
    assert obs.range()[1] == 1.0 and obs.count == 1
    obs.assign(lo, hi)
    assert torch.equal(obs.range()[1], torch.tensor(2.0)) and obs.count == 2


def test_bad_momentum_is_refused():
    with pytest.raises(ValueError, match="momentum"):
        make_observer(QuantSpec.activation(4), momentum=1.0)


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(6 * 36, 3),
        )

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # constant weights: the forwards are PTQ's


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_recorder_ranges_equal_ptq_calibration(observer):
    """The same batches through the recorder (during fit) and through PTQ calibration (same observer class,
    the recorder's EMA momentum) give bit-identical activation qparams."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 6, 6, generator=g) * torch.linspace(0.5, 3.0, 40).view(-1, 1, 1, 1)
    y = torch.randint(0, 3, (40,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    w_spec = QuantSpec.weight(4)
    a_spec = QuantSpec.activation(4, observer=observer)
    rec = QuantErrorRecorder(QuantTarget(weight=w_spec, act=a_spec, keep_first_last_8bit=False), stats_every=1,
                             momentum=0.8)
    module = _Net()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[rec])
    trainer.fit(module, loader)
    assert rec.act_observer(rec.layers[0]).count == 5
    q = quantize_model(
        module.model,
        QuantTarget(act=a_spec, keep_first_last_8bit=False),
        calib_batches=[b for b, _ in loader],
        act_momentum=0.8,
    )
    layers = quantized_layers(q)
    assert len(layers) == len(rec.layers) == 3
    for (_qname, layer), name in zip(layers, rec.layers):
        scale, zp = rec.act_qparams(name)
        assert torch.equal(scale, layer.act_scale), (name, scale, layer.act_scale)
        assert torch.equal(zp, layer.act_zero_point), name
