"""A tiny LightningModule and data for the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import QuantMSEMixin
from tests.helpers import SmallConvNet, blob_data


class TinyLM(QuantMSEMixin, pl.LightningModule):
    def __init__(self, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0, mse_weight: float = 0.0,
                 record: bool = False, fail_at: int | None = None) -> None:
        super().__init__()
        self.model = SmallConvNet()
        self.lr, self.mom, self.wd = lr, momentum, weight_decay
        self.mse_weight = mse_weight
        self.record = record
        self.fail_at = fail_at
        self.seen_train: list[torch.Tensor] = []
        self.seen_val: list[torch.Tensor] = []

    def quant_mse_network(self):
        return self.model

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("boom")
        if self.record:
            self.seen_train.append(self.model.conv2.weight.detach().clone())
        x, y = batch
        out = self.model(x)
        loss = F.cross_entropy(out, y) + self.quant_mse_loss(x, out)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        if self.record and batch_idx == 0:
            self.seen_val.append(self.model.conv2.weight.detach().clone())
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        if self.record and batch_idx == 0:
            self.seen_val.append(self.model.conv2.weight.detach().clone())

    def predict_step(self, batch, batch_idx):
        if self.record and batch_idx == 0:
            self.seen_val.append(self.model.conv2.weight.detach().clone())
        return self.model(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.mom, weight_decay=self.wd)


def loaders(n: int = 256, batch_size: int = 32):
    x, y = blob_data(n)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=False), DataLoader(ds, batch_size=64, shuffle=False)


def trainer(tmp_path=None, **kw) -> pl.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )
    if tmp_path is not None:
        opts["default_root_dir"] = str(tmp_path)
    opts.update(kw)
    return pl.Trainer(**opts)
