"""SAM: the update on hand-computed quadratics, BatchNorm statistics, schedulers, Lightning integration."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning.callbacks.sam import SAM, frozen_running_stats
from tests.helpers import SmallConvNet, blob_data


class Quadratic(nn.Module):
    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w


A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
W0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def closure_for(model: nn.Module, opt: torch.optim.Optimizer, calls: list | None = None):
    def closure():
        opt.zero_grad()
        loss = model()
        loss.backward()
        if calls is not None:
            calls.append(float(loss.detach()))
        return loss

    return closure


def test_one_step_equals_hand_computed_update():
    model = Quadratic(A, W0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)
    calls: list[float] = []
    loss = opt.step(closure_for(model, opt, calls))
    g = A @ W0
    e = 0.1 * g / g.norm()
    expected = W0 - 0.2 * (A @ (W0 + e))
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-6, atol=1e-7)
    assert float(loss.detach()) == pytest.approx(float(0.5 * W0 @ A @ W0))  # the loss at w is returned
    assert calls[1] == pytest.approx(float(0.5 * (W0 + e) @ A @ (W0 + e)))


def test_adaptive_step_equals_hand_computed_update():
    model = Quadratic(A, W0)
    opt = SAM(model.parameters(), "SGD", rho=0.5, adaptive=True, lr=0.1)
    opt.step(closure_for(model, opt))
    g = A @ W0
    e = 0.5 * W0**2 * g / (W0.abs() * g).norm()
    torch.testing.assert_close(model.w.detach(), W0 - 0.1 * (A @ (W0 + e)), rtol=1e-6, atol=1e-7)


def test_rho_zero_is_plain_sgd_and_closure_is_required():
    model = Quadratic(A, W0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    opt.step(closure_for(model, opt))
    assert torch.equal(model.w.detach(), W0 - 0.1 * (A @ W0))
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_weights_restored_when_second_pass_fails():
    model = Quadratic(A, W0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    n = []

    def closure():
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("boom")
        opt.zero_grad()
        loss = model()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert torch.equal(model.w.detach(), W0)
    assert not opt._backup


def test_argument_errors():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        SAM(p, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="adaptive must be True or False"):
        SAM(p, torch.optim.SGD, adaptive="yes", lr=0.1)
    with pytest.raises(TypeError, match="Optimizer subclass"):
        SAM(p, nn.Linear, lr=0.1)
    with pytest.raises(ValueError, match="not a torch.optim class"):
        SAM(p, "NoSuchOpt", lr=0.1)
    with pytest.raises(ValueError, match="cannot import"):
        SAM(p, "torch.optim.NoSuchOpt", lr=0.1)
    with pytest.raises(TypeError, match="cannot be SAM"):
        SAM(p, SAM, lr=0.1)
    assert isinstance(SAM(p, "torch.optim.AdamW", lr=1e-3).base_optimizer, torch.optim.AdamW)


# ----------------------------------------------------------------------------------------- BatchNorm
def test_second_pass_does_not_update_batchnorm_statistics():
    x, y = blob_data(16)
    model = SmallConvNet(width=4).train()
    plain = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        plain(x)
    for name in ("bn1", "bn2", "bn3"):
        a, b = getattr(model, name), getattr(plain, name)
        assert torch.equal(a.running_mean, b.running_mean), name
        assert torch.equal(a.running_var, b.running_var), name
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1


def test_frozen_running_stats_leaves_eval_and_outside_modules_alone():
    bn = nn.BatchNorm1d(3).train()
    with frozen_running_stats():
        bn(torch.randn(8, 3) + 5)
    assert torch.equal(bn.running_mean, torch.zeros(3))
    bn(torch.randn(8, 3) + 5)  # hook removed: updates again
    assert bn.running_mean.abs().sum() > 0


# ----------------------------------------------------------------------------------- groups / state
def test_param_groups_shared_and_schedulers_work():
    model = nn.Linear(3, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["momentum"] == 0.9
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
        sched.step()
    expected = 0.1 * (1 + math.cos(math.pi * 2 / 4)) / 2
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected)

    opt2 = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    one = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=1.0, total_steps=10)
    opt2.step(closure)
    one.step()
    assert opt2.base_optimizer.param_groups[0]["momentum"] != 0.9  # momentum cycling reached the base
    assert opt2.base_optimizer.param_groups[0]["lr"] > 1.0 / 25.0


def test_state_dict_round_trip_and_add_param_group():
    model = nn.Linear(3, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in sd["state"].values())
    opt2 = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.5, momentum=0.9)
    opt2.load_state_dict(sd)
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    assert opt2.param_groups[0]["rho"] == 0.05 and opt2.param_groups[0]["lr"] == 0.1
    buf = opt2.state[model.weight]["momentum_buffer"]
    assert torch.equal(buf, opt.state[model.weight]["momentum_buffer"])

    extra = nn.Parameter(torch.zeros(2))
    opt2.add_param_group({"params": [extra], "lr": 0.01})
    assert len(opt2.base_optimizer.param_groups) == 2 and opt2.param_groups[1]["rho"] == 0.2
    clone = copy.deepcopy(opt2)
    assert clone.param_groups is clone.base_optimizer.param_groups


# ------------------------------------------------------------------------------------------ Lightning
class TinyModule(L.LightningModule):
    def __init__(self, rho: float = 0.05) -> None:
        super().__init__()
        self.net = SmallConvNet(width=4)
        self.rho = rho
        self.grads_finite: list[bool] = []
        self.epoch_losses: list[float] = []
        self._sum = 0.0
        self._n = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # loss at w of every step (the closure's first result), evaluated before the update
        self._sum += float(outputs["loss"])
        self._n += 1

    def on_train_epoch_end(self):
        self.epoch_losses.append(self._sum / max(self._n, 1))
        self._sum, self._n = 0.0, 0

    def on_before_optimizer_step(self, optimizer):
        self.grads_finite.append(
            all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None)
        )

    def configure_optimizers(self):
        opt = SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
        return [opt], [sched]


def _loader(n: int = 128) -> DataLoader:
    x, y = blob_data(n)
    return DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_lightning_training_with_sam_decreases_loss(tmp_path):
    module = TinyModule()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, _loader())
    assert len(module.epoch_losses) == 2
    assert module.epoch_losses[1] < module.epoch_losses[0]
    assert all(module.grads_finite)
    opt = trainer.optimizers[0]
    assert isinstance(opt, SAM) and not opt._backup
    # cosine schedule stepped on the base optimizer: lr fell from 0.05 to 0 after T_max=2 epochs
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_lightning_bf16_mixed_grads_finite(tmp_path):
    module = TinyModule()
    trainer = _trainer(tmp_path, max_steps=3, precision="bf16-mixed")
    trainer.fit(module, _loader(48))
    assert module.grads_finite and all(module.grads_finite)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(p.dtype == torch.float32 for p in module.parameters())
