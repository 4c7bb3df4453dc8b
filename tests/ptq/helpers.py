"""Shared by the PTQ tests: a trained small network, a hand-written quantized forward, Lightning wrappers."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning.quant import QuantSpec, compute_qparams, fake_quantize
from tests.helpers import SmallConvNet, blob_data

LAYERS = ("conv1", "conv2", "conv3", "fc")


# helpers ---------------------------------------------------------------------------------------------------
def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def _hand_layer_bits(wbits: int, abits: int, keep_first_last_8bit: bool = True) -> dict[str, tuple[int, int]]:
    edge = ("conv1", "fc") if keep_first_last_8bit else ()
    return {n: ((max(wbits, 8), max(abits, 8)) if n in edge else (wbits, abits)) for n in LAYERS}


def hand_quantized_forward(
    folded: SmallConvNet, calib: list[torch.Tensor], x: torch.Tensor, wbits: int, abits: int
) -> torch.Tensor:
    """SmallConvNet's quantized forward written out: fake-quant weights, min-max calibrated inputs."""
    bits = _hand_layer_bits(wbits, abits)
    wq = {}
    for n in LAYERS:
        w = getattr(folded, n).weight.detach()
        spec = QuantSpec.weight(bits[n][0])
        s, z = compute_qparams(w, spec)
        wq[n] = fake_quantize(w, spec, s, z)

    def forward(h: torch.Tensor, act: dict | None, record: dict | None) -> torch.Tensor:
        def q_in(n: str, t: torch.Tensor) -> torch.Tensor:
            if record is not None:
                record.setdefault(n, []).append(torch.stack([t.min(), t.max()]))
            if act is None:
                return t
            spec, s, z = act[n]
            return fake_quantize(t, spec, s, z)

        for n in ("conv1", "conv2", "conv3"):
            h = torch.relu(F.conv2d(q_in(n, h), wq[n], getattr(folded, n).bias, padding=1))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return F.linear(q_in("fc", h), wq["fc"], folded.fc.bias)

    with torch.no_grad():
        rec: dict[str, list[torch.Tensor]] = {}
        for xb in calib:  # calibration: quantized weights, float inputs, running min/max per layer input
            forward(xb, None, rec)
        act = {}
        for n in LAYERS:
            r = torch.stack(rec[n])
            spec = QuantSpec.activation(bits[n][1])
            act[n] = (spec, *compute_qparams((r[:, 0].min(), r[:, 1].max()), spec))
        return forward(x, act, None)


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).sum()) / len(y) * 100.0


# numbers ---------------------------------------------------------------------------------------------------
class _LitNet(L.LightningModule):
    """SmallConvNet as ``self.model``, train data only (subclasses add val/test loaders)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = SmallConvNet()
        self.steps = 0
        self.x, self.y = blob_data(256, seed=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return _loader(self.x, self.y, 32, shuffle=True)


class _LitNetVal(_LitNet):
    def val_dataloader(self):
        x, y = blob_data(128, seed=1)
        return _loader(x, y, 64)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.model(x), y))
