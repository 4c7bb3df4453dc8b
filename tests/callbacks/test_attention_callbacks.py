"""DNQ callbacks on a tiny timm ViT: attention points recorded and noised during fit, gone afterwards."""

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from timm.layers import Attention
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import (
    DifferentialNoiseInjection,
    QuantErrorRecorder,
    QuantMSEMixin,
    QuantTarget,
    dnq_callbacks,
)
from flatq_lightning.quant import QuantPoint, is_patched_attention
from tests.callbacks.lm import trainer

POINTS = ("quant_q", "quant_k", "quant_v", "quant_attn")


class TinyViTLM(QuantMSEMixin, pl.LightningModule):
    """A 2-block timm ``test_vit`` classifier on 16×16 images (with the FP-vs-quantized MSE term)."""

    def __init__(self, mse_weight: float = 0.0, fail_at: int | None = None) -> None:
        super().__init__()
        self.model = timm.create_model("test_vit", pretrained=False, img_size=16, patch_size=8, depth=2, num_classes=4)
        self.mse_weight = mse_weight
        self.fail_at = fail_at
        self.patched_in_val: list[bool] = []

    def quant_mse_network(self):
        return self.model

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        out = self.model(x)
        return F.cross_entropy(out, y) + self.quant_mse_loss(x, out)

    def validation_step(self, batch, batch_idx):
        self.patched_in_val.append(is_patched_attention(self.model.blocks[0].attn))
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def vit_loaders(n: int = 64, batch_size: int = 16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=32)


def assert_pristine(model: torch.nn.Module) -> None:
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == 2
    for m in attns:
        assert type(m) is Attention and "forward" not in m.__dict__
        assert not any(isinstance(c, QuantPoint) for c in m.children())
    assert not any(isinstance(m, QuantPoint) for m in model.modules())


def _point_names(rec: QuantErrorRecorder) -> list[str]:
    return [n for n in rec.layers if n.endswith(POINTS)]


def test_dnq_fit_records_attention_points_and_restores_timm():
    seed_everything(0)
    lm = TinyViTLM(mse_weight=0.5)
    keys = list(lm.state_dict())
    cbs = dnq_callbacks("w4a4", stats_every=1, p=1.0)
    rec, noise = cbs[0], cbs[1]
    train, val = vit_loaders()
    trainer(max_epochs=1, callbacks=cbs).fit(lm, train, val)

    assert_pristine(lm)
    assert list(lm.state_dict()) == keys
    assert lm.patched_in_val and all(lm.patched_in_val)  # validation during fit ran with the points in place
    points = _point_names(rec)
    assert len(points) == 8 and {n.rsplit(".", 1)[1] for n in points} == set(POINTS)
    for n in points:  # activation statistics like any layer input, no weight statistics
        assert n in rec.act_mean and n in rec.act_sqnr_db and torch.isfinite(rec.act_sqnr_db[n])
        assert n not in rec.weight_mean and n not in rec.weight_layers
        assert rec.specs[n][1].bits == 4
    assert rec.weight_layers == [n for n in rec.layers if n not in points]
    assert set(rec.weight_mean) == set(rec.weight_layers)
    assert noise._names == rec.weight_layers
    assert "-" in rec.summary()
    # fused attention is back
    lm.eval()
    with torch.no_grad():
        lm.model(torch.randn(1, 3, 16, 16))


def test_activation_noise_reaches_softmax_output():
    """With p=1 the softmax output seen after the point is noisy (rows no longer sum to one) while training."""
    seed_everything(0)
    lm = TinyViTLM()
    cbs = dnq_callbacks("w4a4", stats_every=1, p=1.0, weight_noise=False)
    row_err: list[float] = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.model.blocks[0].attn.quant_attn.register_forward_hook(
                lambda m, a, out: row_err.append(float((out.detach().sum(-1) - 1).abs().max()))
            )

    train, _ = vit_loaders()
    trainer(max_epochs=1, callbacks=[*cbs, Probe()]).fit(lm, train)
    assert row_err[0] < 1e-5  # step 0: no statistics yet, no noise
    assert max(row_err[1:]) > 1e-3
    assert_pristine(lm)


def test_attention_points_off():
    lm = TinyViTLM()
    rec = QuantErrorRecorder(QuantTarget.preset("w4a4", attention_points=False), stats_every=1)
    train, _ = vit_loaders(32)
    trainer(max_epochs=1, callbacks=[rec]).fit(lm, train)
    assert not _point_names(rec) and rec.layers == rec.weight_layers
    assert_pristine(lm)


def test_points_removed_on_exception_and_reattached_by_a_second_fit():
    lm = TinyViTLM(fail_at=2)
    rec = QuantErrorRecorder("w4a4", stats_every=1, refresh_weights=False)
    noise = DifferentialNoiseInjection(rec)
    train, _ = vit_loaders()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_epochs=1, callbacks=[rec, noise]).fit(lm, train)
    assert_pristine(lm)
    first = {n: rec.modules[n] for n in _point_names(rec)}
    assert len(first) == 8

    lm.fail_at = None
    trainer(max_epochs=1, callbacks=[rec, noise]).fit(lm, train)
    assert_pristine(lm)
    second = {n: rec.modules[n] for n in _point_names(rec)}
    assert set(second) == set(first) and all(second[n] is not first[n] for n in first)  # selected afresh
    assert rec.act_refreshed_at == 3


def test_invalid_attention_points_flag():
    with pytest.raises(ValueError, match="attention_points must be True or False"):
        QuantTarget.preset("w4a4", attention_points="yes")


def test_points_alone_are_no_target():
    lm = TinyViTLM()
    rec = QuantErrorRecorder(QuantTarget.preset("w4a4", include="*.quant_*"))
    train, _ = vit_loaders(16)
    with pytest.raises(ValueError, match="has no quantizable layers"):
        trainer(max_epochs=1, callbacks=[rec]).fit(lm, train)
    assert_pristine(lm)
