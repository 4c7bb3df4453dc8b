"""DNQ with the "onnxruntime" quantizer placement: the fit records and perturbs the points PTQ will quantize,
each tensor once."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import DNQ
from flatq_lightning.app.models.cifar_resnet import CifarResNet
from flatq_lightning.quant.placement import placement_points


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = CifarResNet(depth=8, num_classes=4, widths=(4, 8, 8))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(placement: str) -> tuple[DNQ, _Module, dict[str, list[str]]]:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 4, (64,))), batch_size=16)
    module = _Module()
    dnq = DNQ("w4a4", stats_every=1, clean_bn_batches=0, placement=placement)
    seen: dict[str, list[str]] = {}

    class Spy(pl.Callback):  # what the model carries during the fit
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.setdefault("points", placement_points(pl_module))

    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[dnq, Spy()], accelerator="cpu")
    trainer.fit(module, data)
    return dnq, module, seen


def test_the_fit_records_the_points_and_each_tensor_once():
    dnq, module, seen = _fit("onnxruntime")
    rec = dnq.recorder
    assert "model.layer1.0.quant_in" in seen["points"] and "model.layer1.0.bn2.quant_out" in seen["points"]
    assert "model.layer1.0.quant_in" in rec.layers and "model.layer2.0.quant_out" in rec.layers
    # the first conv of a block reads the block input point's output: recorded (and perturbed) at the point only
    assert rec.shared_inputs["model.layer1.0.conv1"] == "model.layer1.0.quant_in"
    assert rec.shared_inputs["model.layer2.0.quant_in"] == "model.layer1.0.quant_out"
    assert "model.layer1.0.conv1" not in rec.act_mean and "model.layer1.0.quant_in" in rec.act_mean
    assert "model.layer1.0.bn2.quant_out" in rec.act_mean
    assert "model.layer1.0.conv1" in rec.weight_mean  # its weight is recorded as before
    assert placement_points(module) == []  # the points are gone after the fit


def test_the_default_placement_adds_nothing():
    dnq, module, seen = _fit("layer_inputs")
    assert seen["points"] == [] and dnq.recorder.shared_inputs == {}
    assert "model.layer1.0.conv1" in dnq.recorder.act_mean
