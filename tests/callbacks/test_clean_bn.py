"""End of fit under DNQ noise: BatchNorm statistics re-estimated on the clean weights (model, checkpoint)."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import QuantTarget, dnq_callbacks
from flatq_lightning.callbacks.weight_noise import NOISY_BN_KEY, DifferentialNoiseInjection
from flatq_lightning.quant import bn_state
from tests.callbacks.lm import TinyLM, trainer
from tests.helpers import blob_data


def _fit(clean_bn_batches: int, tmp_path=None, **kw):
    x, y = blob_data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    module = TinyLM(lr=0.0)  # constant clean weights: whatever differs after fit is the noise's doing
    cbs = dnq_callbacks(QuantTarget.preset("w2a2", keep_first_last_8bit=False), stats_every=1, seed=0)
    noise = next(c for c in cbs if isinstance(c, DifferentialNoiseInjection))
    noise.clean_bn_batches = clean_bn_batches
    t = trainer(tmp_path, max_epochs=2, callbacks=[*cbs, *kw.pop("extra", [])], **kw)
    t.fit(module, loader)
    return module, noise, t, x


def test_fit_returns_clean_bn_statistics_and_keeps_the_noisy_set():
    module, noise, t, x = _fit(clean_bn_batches=4)
    assert noise.noisy_bn_state is not None
    clean = bn_state(module)
    # lr = 0: the clean weights are the initial ones, so the clean running mean of bn1 is the per-channel
    # mean of conv1's output over the whole data set (4 batches of 16 = all 64 images, equal batch sizes)
    with torch.no_grad():
        expected = module.model.conv1(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(clean["model.bn1"]["running_mean"], expected, rtol=0, atol=1e-5)
    # the statistics gathered under 2-bit noise are a different set
    noisy = noise.noisy_bn_state
    assert not torch.allclose(noisy["model.bn2"]["running_var"], clean["model.bn2"]["running_var"], rtol=1e-3)


def test_clean_bn_off_keeps_the_noisy_statistics():
    module, noise, _, x = _fit(clean_bn_batches=0)
    assert noise.noisy_bn_state is None
    with torch.no_grad():
        full_mean = module.model.conv1(x).mean(dim=(0, 2, 3))
    # momentum-0.1 statistics of a short run are far from the data's
    assert not torch.allclose(module.model.bn1.running_mean, full_mean, atol=1e-3)


def test_checkpoint_holds_clean_statistics_and_the_noisy_set(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    module, noise, t, _ = _fit(clean_bn_batches=4, tmp_path=tmp_path, extra=[ckpt], enable_checkpointing=True)
    raw = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    sd = raw["state_dict"]
    # the last checkpoint was written after the last step, with the same seeded re-estimation as the end of fit
    # (on weights that differ from the end of fit's by the float rounding of removing the noise)
    for name, buffers in bn_state(module).items():
        torch.testing.assert_close(sd[f"{name}.running_mean"], buffers["running_mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sd[f"{name}.running_var"], buffers["running_var"], rtol=1e-5, atol=1e-6)
    noisy = raw[NOISY_BN_KEY]
    for name, buffers in noise.noisy_bn_state.items():
        assert torch.equal(noisy[name]["running_var"], buffers["running_var"]), name


def test_reestimation_leaves_the_training_run_unchanged(tmp_path):
    """Re-estimating at each checkpoint uses its own loader and generator: the weights a run ends with do not
    depend on whether checkpoints (and so re-estimations) happened."""
    def run(with_ckpt: bool):
        x, y = blob_data(64)
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        torch.manual_seed(0)
        module = TinyLM(lr=0.05)
        cbs = dnq_callbacks("w4a4", stats_every=2, seed=0)
        extra = [ModelCheckpoint(dirpath=tmp_path / str(with_ckpt), every_n_epochs=1)] if with_ckpt else []
        t = trainer(tmp_path, max_epochs=2, callbacks=[*cbs, *extra], enable_checkpointing=with_ckpt)
        torch.manual_seed(1)
        t.fit(module, loader)
        return module.model.conv2.weight.detach().clone()

    assert torch.equal(run(True), run(False))


def test_dnq_callbacks_and_hydra_config_pass_clean_bn_batches():
    from flatq_lightning.callbacks import dnq_callbacks as make
    from tests.app.test_train import _compose

    noise = next(c for c in make("w4a4", clean_bn_batches=7) if isinstance(c, DifferentialNoiseInjection))
    assert noise.clean_bn_batches == 7
    cfg = _compose(["experiment=cifar10_resnet20_dnq", "callbacks.dnq.clean_bn_batches=0"])
    assert cfg.callbacks.dnq.clean_bn_batches == 0
    import pytest

    with pytest.raises(ValueError, match="clean_bn_batches must be an int >= 0"):
        make("w4a4", clean_bn_batches=-1)


def test_ptq_callback_fp_row_sees_the_clean_statistics(tmp_path):
    """The PTQ callback runs after the end-of-fit re-estimation: its FP row is the clean-BN network's."""
    from flatq_lightning import PostTrainingQuantization
    from flatq_lightning.ptq.runner import evaluate_topk
    from flatq_lightning.quant import load_bn_state

    x, y = blob_data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x, y), batch_size=64)
    module = TinyLM(lr=0.0)
    cbs = dnq_callbacks(QuantTarget.preset("w2a2", keep_first_last_8bit=False), stats_every=1, seed=0, clean_bn_batches=4)
    ptq = PostTrainingQuantization(bits=("w8a8",), calib_batches=1, progress=False, print_report=False,
                                   save_dir=tmp_path / "ptq")
    trainer(tmp_path, max_epochs=2, callbacks=[*cbs, ptq], limit_val_batches=0).fit(module, loader, val)
    clean_acc = evaluate_topk(module.model, val, "cpu")[0][1]
    assert ptq.report.fp_top1 == clean_acc
    noise = next(c for c in cbs if isinstance(c, DifferentialNoiseInjection))
    with torch.no_grad():
        clean_logits = module.model.eval()(x)
        load_bn_state(module, noise.noisy_bn_state)
        noisy_logits = module.model.eval()(x)
    assert not torch.allclose(clean_logits, noisy_logits, atol=1e-3)  # the two sets really differ


def test_resume_trains_on_with_the_noisy_statistics(tmp_path):
    """The checkpoint's state_dict holds clean statistics; a resume puts the noisy set back before training."""
    import lightning.pytorch as pl

    x, y = blob_data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    cbs = dnq_callbacks(QuantTarget.preset("w2a2", keep_first_last_8bit=False), stats_every=1, seed=0, clean_bn_batches=4)
    trainer(tmp_path, max_epochs=1, callbacks=[*cbs, ckpt], enable_checkpointing=True).fit(TinyLM(lr=0.01), loader)
    raw = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    noisy = raw[NOISY_BN_KEY]
    assert not torch.equal(raw["state_dict"]["model.bn2.running_var"], noisy["model.bn2"]["running_var"])

    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(bn_state(pl_module))

    cbs2 = dnq_callbacks(QuantTarget.preset("w2a2", keep_first_last_8bit=False), stats_every=1, seed=0, clean_bn_batches=4)
    trainer(tmp_path, max_epochs=2, callbacks=[*cbs2, Probe()]).fit(
        TinyLM(lr=0.01), loader, ckpt_path=str(tmp_path / "last.ckpt"))
    for name, buffers in noisy.items():
        assert torch.equal(seen[name]["running_var"], buffers["running_var"]), name
        assert torch.equal(seen[name]["running_mean"], buffers["running_mean"]), name
