import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from flatq_lightning import (
    ActivationNoiseInjection,
    DifferentialNoiseInjection,
    QuantErrorRecorder,
    Ramp,
    Warmup,
    dnq_callbacks,
)
from flatq_lightning.callbacks.noise_source import NoiseSource
from tests.callbacks.lm import TinyLM, loaders, trainer


def _fit(callbacks, epochs=2, seed=0, accumulate=1, lm_kw=None, **tkw):
    seed_everything(seed)
    model = TinyLM(**(lm_kw or {}))
    train, val = loaders()
    t = trainer(max_epochs=epochs, callbacks=callbacks, accumulate_grad_batches=accumulate, **tkw)
    t.fit(model, train, val)
    return model, t


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["zero_scale", "off"])
def test_zero_noise_is_bit_for_bit_plain_training(variant):
    plain, _ = _fit([])
    if variant == "zero_scale":
        cbs = dnq_callbacks("w4a4", noise_scale=0.0, act_noise_scale=0.0, stats_every=2)
    else:
        cbs = dnq_callbacks("w4a4", mode="off", act_noise=False, stats_every=2)
    noisy, _ = _fit(cbs)
    a, b = _sd(plain), _sd(noisy)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert cbs[0].weight_mean, "the recorder still measured"


def test_noise_changes_training_and_weights_end_clean():
    plain, _ = _fit([])
    cbs = dnq_callbacks("w4a4", stats_every=2)
    noisy, _ = _fit(cbs)
    diff = max((plain.state_dict()[k] - noisy.state_dict()[k]).abs().max() for k in plain.state_dict() if "weight" in k)
    assert diff > 1e-4  # the noise did something
    # no hooks left on any module after fit
    assert all(not m._forward_pre_hooks for m in noisy.modules())
    assert cbs[1]._applied is None


def test_clean_weights_in_val_test_predict_checkpoint_and_after_fit(tmp_path):
    # lr = 0: the clean weight never changes, so anything but W0 (up to float rounding) is leaked noise
    seed_everything(0)
    model = TinyLM(lr=0.0, record=True)
    w0 = model.model.conv2.weight.detach().clone()
    train, val = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    cbs = dnq_callbacks("w4a4", stats_every=2)
    t = trainer(tmp_path, max_epochs=2, callbacks=[*cbs, ckpt], enable_checkpointing=True)
    t.fit(model, train, val)
    assert len(model.seen_train) == 16
    # training forwards saw noisy weights, each step different
    assert all((w - w0).abs().max() > 1e-3 for w in model.seen_train)
    assert not torch.equal(model.seen_train[0], model.seen_train[1])
    for w in model.seen_val:
        torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.model.conv2.weight.detach(), w0, rtol=0, atol=1e-6)
    sd = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(sd["model.conv2.weight"], w0, rtol=0, atol=1e-6)
    model.seen_val.clear()
    t.test(model, val, verbose=False)
    t.predict(model, val)
    assert len(model.seen_val) == 2
    for w in model.seen_val:
        torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)


def test_clean_weights_after_exception():
    seed_everything(0)
    model = TinyLM(lr=0.0, fail_at=5)
    w0 = model.model.conv2.weight.detach().clone()
    train, val = loaders()
    cbs = dnq_callbacks("w4a4", stats_every=2)
    t = trainer(max_epochs=2, callbacks=cbs)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(model, train, val)
    torch.testing.assert_close(model.model.conv2.weight.detach(), w0, rtol=0, atol=1e-6)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("source", ["generator", "pool"])
def test_differential_and_add_remove_same_clean_trajectory(source):
    # Statistics are refreshed once (step 0): a later refresh re-rounds weights that differ between the two
    # modes by float rounding, and a weight sitting on a rounding boundary then shifts sigma discontinuously.
    rec_a = QuantErrorRecorder("w4a4", stats_every=1000, record_activations=False, refresh_weights=False)
    # One epoch: over longer runs float-rounding differences get amplified chaotically by ReLU kinks.
    a, _ = _fit([rec_a, DifferentialNoiseInjection(rec_a, mode="differential", seed=7, noise_source=source)], epochs=1)
    rec_b = QuantErrorRecorder("w4a4", stats_every=1000, record_activations=False, refresh_weights=False)
    b, _ = _fit([rec_b, DifferentialNoiseInjection(rec_b, mode="add_remove", seed=7, noise_source=source)], epochs=1)
    plain, _ = _fit([], epochs=1)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=1e-6)
    assert (a.model.conv2.weight - plain.model.conv2.weight).abs().max() > 1e-4


def test_gradient_accumulation_noise_changes_only_on_optimizer_steps():
    seed_everything(0)
    model = TinyLM(lr=0.0, record=True)
    train, val = loaders()
    cbs = dnq_callbacks("w4a4", stats_every=2, act_noise=False)
    t = trainer(max_epochs=1, callbacks=cbs, accumulate_grad_batches=2)
    t.fit(model, train, val)
    seen = model.seen_train
    assert len(seen) == 8 and t.global_step == 4
    for i in range(0, 8, 2):
        assert torch.equal(seen[i], seen[i + 1])  # same optimizer step: same noise
    for i in range(0, 6, 2):
        assert not torch.equal(seen[i], seen[i + 2])  # a new step: new noise


def test_resume_continues_exactly(tmp_path):
    def cbs(seed=3):
        return dnq_callbacks("w4a4", stats_every=3, seed=seed)

    full_cbs = cbs()
    full, _ = _fit(full_cbs, epochs=4)
    other, _ = _fit(cbs(seed=4), epochs=4)  # another noise sequence: the scale of a real difference

    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first_cbs = cbs()
    _fit([*first_cbs, ck], epochs=2, enable_checkpointing=True, default_root_dir=str(tmp_path))
    # the noise that was inside the weights when the checkpoint was written
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][first_cbs[1].state_key]["applied"]
    seed_everything(0)
    resumed = TinyLM()
    train, val = loaders()
    res_cbs = cbs()
    t = trainer(tmp_path, max_epochs=4, callbacks=res_cbs)
    res_cbs[1].on_train_start = _spy(res_cbs[1], res_cbs[1].on_train_start)
    t.fit(resumed, train, val, ckpt_path=str(tmp_path / "last.ckpt"))
    # the resumed run re-applied exactly the saved noise (same step, same coefficients) ...
    first = res_cbs[1].seen_at_start
    assert first.step == saved["step"] == 16 and first.kappa == saved["kappa"]
    for a, b in zip(first.b, saved["b"]):
        assert torch.equal(a, b)
    # ... and ends where the uninterrupted run ends: clean weights are float-rounded (W + δ − δ), so allow
    # rounding, but far below what a different noise sequence gives
    real = max((full.state_dict()[k] - other.state_dict()[k]).abs().max() for k in full.state_dict() if "weight" in k)
    gap = max((full.state_dict()[k] - resumed.state_dict()[k]).abs().max() for k in full.state_dict() if "weight" in k)
    assert real > 1e-3 and gap < 0.01 * real, (gap, real)
    for n in full_cbs[0].layers:
        torch.testing.assert_close(res_cbs[0].weight_var[n], full_cbs[0].weight_var[n], rtol=1e-2, atol=0)
        torch.testing.assert_close(res_cbs[0].act_var[n], full_cbs[0].act_var[n], rtol=1e-2, atol=0)
    assert res_cbs[1]._applied is None  # clean at the end


def _spy(cb, fn):
    def wrapped(trainer, pl_module):
        fn(trainer, pl_module)
        cb.seen_at_start = cb._applied

    return wrapped


def test_bf16_mixed_on_cpu():
    cbs = dnq_callbacks("w4a4", stats_every=2)
    model, _ = _fit(cbs, precision="bf16-mixed", lm_kw={"mse_weight": 0.5})
    rec = cbs[0]
    for n in rec.layers:
        assert rec.weight_var[n].dtype == torch.float32
        assert rec.act_var[n].dtype == torch.float32
        assert torch.isfinite(rec.act_var[n]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_noise_statistics_match_recorded_error():
    seed_everything(0)
    model = TinyLM()
    train, val = loaders()
    for source in ("generator", "pool"):
        rec = QuantErrorRecorder("w4a4", stats_every=1000, record_activations=False, refresh_weights=False)
        noise = DifferentialNoiseInjection(rec, noise_source=source, pool_fraction=1.0)
        t = trainer(max_steps=1, callbacks=[rec, noise])
        t.fit(model, train, val)
        assert rec.layers and rec.weight_mean  # selected and measured by the fit
        noise._prepare(model)
        noise._applied = noise._coefficients(5, torch.device("cpu"))
        n = "model.conv3"
        deltas = torch.stack([noise.current_noise(n) for _ in range(1)])
        d = deltas[0].reshape(deltas.shape[1], -1)
        torch.testing.assert_close(d.mean(1), rec.weight_mean[n], atol=4 * rec.weight_var[n].max().sqrt().item() / 12, rtol=0)
        ratio = d.std(1) / rec.weight_var[n].sqrt()
        assert ((ratio > 0.6) & (ratio < 1.4)).all(), ratio
        # regenerated exactly from the key, different for another step
        again = noise.current_noise(n)
        assert torch.equal(again, deltas[0])
        noise._applied = noise._coefficients(6, torch.device("cpu"))
        assert not torch.equal(noise.current_noise(n), deltas[0])


def test_pool_source_memory_and_windows():
    src = NoiseSource("pool", "normal", seed=1, pool_numel=1 << 12)
    assert src.memory_bytes() == 0  # drawn on first use
    chunks = list(src.chunks((0, 0), rows=100, cols=300, device=torch.device("cpu"), dtype=torch.float32))
    assert sum(r1 - r0 for r0, r1, _ in chunks) == 100
    pool = src.pool(torch.device("cpu"), torch.float32)
    assert src.memory_bytes() == (1 << 12) * 4
    for _, _, e in chunks:
        assert e.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()  # views, no copies
    big = src.full((1, 2), torch.Size([3, 5000]), torch.device("cpu"), torch.float32)
    assert big.shape == (3, 5000) and abs(float(big.std()) - 1) < 0.1
    assert torch.equal(big, src.full((1, 2), torch.Size([3, 5000]), torch.device("cpu"), torch.float32))


def test_auto_pool_is_small_relative_to_weights():
    import torch.nn as nn

    class Big(TinyLM):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.Linear(1024, 4))

    m = Big()
    rec = QuantErrorRecorder("w4a4", refresh_weights=False)
    noise = DifferentialNoiseInjection(rec)
    rec.setup(trainer(), m, "fit")
    noise._prepare(m)
    total = sum(m_.weight.numel() for m_ in rec.modules.values())
    assert total >= 1 << 21 and noise._source.kind == "pool"
    assert noise._source.pool_numel <= total / 32 + 1
    noise._source.pool(torch.device("cpu"), torch.float32)
    assert noise.noise_memory_bytes() == noise._source.pool_numel * 4  # what overhead.py reports


def test_ramp_schedule_and_warmup():
    rec = QuantErrorRecorder("w4a4", refresh_weights=False)
    noise = DifferentialNoiseInjection(rec, noise_scale=Warmup(Ramp(2.0, 10), steps=3))
    assert noise.kappa(0) == 0.0 and noise.kappa(2) == 0.0
    assert noise.kappa(5) == pytest.approx(1.0) and noise.kappa(100) == 2.0


def test_warmup_fraction_keeps_the_first_part_of_the_fit_clean():
    """warmup_fraction = 0.5 of a 16-step fit: both noises off for steps 0-7, on from step 8."""
    from lightning.pytorch.callbacks import Callback

    class Spy(Callback):
        def __init__(self, noise, act):
            self.noise, self.act, self.seen = noise, act, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            self.seen.append((step, self.noise.kappa(step), self.act._kappa))

    cbs = dnq_callbacks("w4a4", warmup_fraction=0.5, stats_every=2)
    noise, act = cbs[1], cbs[2]
    spy = Spy(noise, act)
    _, t = _fit([*cbs, spy], epochs=2)  # 8 batches per epoch
    assert t.global_step == 16 and noise.warmup_steps == act.warmup_steps == 8
    assert [(k, a) for s, k, a in spy.seen if s < 8] == [(0.0, 0.0)] * 8
    assert all(k == 1.0 and a == 1.0 for s, k, a in spy.seen if s >= 8)
    # a run with no finite length cannot resolve a fraction
    rec = QuantErrorRecorder("w4a4", refresh_weights=False)
    late = DifferentialNoiseInjection(rec, noise_scale=Warmup(fraction=0.5))
    with pytest.raises(ValueError, match="warmup_fraction needs a finite run"):
        _fit([rec, late], epochs=-1, max_steps=-1)


def test_activation_noise_is_applied_with_probability_p():
    seed_everything(0)
    model = TinyLM()
    train, val = loaders()
    rec = QuantErrorRecorder("w4a4", stats_every=1)
    act = ActivationNoiseInjection(rec, p=0.5, seed=1)
    t = trainer(max_epochs=1, callbacks=[rec, act])
    t.fit(model, train, val)
    counts = []
    for step in range(200):
        act.on_train_batch_start(t, model, None, step)
        counts.append(len(act._active))
    frac = sum(counts) / (200 * len(rec.layers))
    assert 0.4 < frac < 0.6
    # the hook really perturbs the input with the recorded statistics
    act._source = NoiseSource("generator", "normal", 0)
    act._kappa, act._active = 1.0, set(rec.layers)
    act.on_train_start(t, model)
    captured = {}
    h = model.model.conv3.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    model.train()
    x = torch.randn(16, 1, 8, 8)
    model.model(x)
    h.remove()
    act.remove_hooks()
    model.eval()
    clean = {}
    h = model.model.conv3.register_forward_pre_hook(lambda m, a: clean.setdefault("x", a[0]))
    model.model.train()
    with torch.no_grad():
        # BN in train mode uses batch stats in both passes; compare noise magnitude to the recorded sigma
        model.model(x)
    h.remove()
    assert not torch.equal(captured["x"], clean["x"])


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda r: DifferentialNoiseInjection(r, mode="loud"), r"mode must be one of \('differential'"),
        (lambda r: DifferentialNoiseInjection(r, noise_scale=-1.0), "noise_scale must be a finite float >= 0"),
        (lambda r: DifferentialNoiseInjection(r, noise_source="disk"), "noise_source must be one of"),
        (lambda r: DifferentialNoiseInjection(r, noise_scale=Warmup(steps=-1)), "Warmup steps must be an int >= 0"),
        (lambda r: DifferentialNoiseInjection(r, noise_scale=Warmup(fraction=1.0)), r"Warmup fraction must be a float in \[0, 1\)"),
        (lambda r: ActivationNoiseInjection(r, noise_scale=Warmup(steps=4, fraction=0.5)), "not both"),
        (lambda r: ActivationNoiseInjection(r, noise_scale=Warmup(-1.0)), "Warmup scale must be a finite float >= 0"),
        (lambda r: ActivationNoiseInjection(r, pool_numel=1), "pool_numel must be an int >= 2"),
        (lambda r: ActivationNoiseInjection(r, p=1.5), r"p must be a probability in \[0, 1\]"),
        (lambda r: ActivationNoiseInjection(r, p=-0.1), r"p must be a probability in \[0, 1\]"),
        (lambda r: ActivationNoiseInjection(r, noise_scale=-2), "noise_scale must be a finite float >= 0"),
        (lambda r: DifferentialNoiseInjection("rec"), "recorder must be a QuantErrorRecorder"),
    ],
)
def test_bad_arguments(make, msg):
    with pytest.raises(ValueError, match=msg):
        make(QuantErrorRecorder("w4a4"))


def test_quant_mse_term_logged_and_uses_recorder_ranges():
    cbs = dnq_callbacks("w4a4", stats_every=2)
    model, t = _fit(cbs, epochs=1, lm_kw={"mse_weight": 1.0})
    assert "train/quant_mse" in t.callback_metrics
    assert float(t.callback_metrics["train/quant_mse"]) > 0


def test_clean_weight_inside_training_step_is_the_clean_weight():
    # lr = 0: the clean weight stays W0 while the parameter holds W0 + δ_t
    seen = []

    class Probe(TinyLM):
        def training_step(self, batch, batch_idx):
            noise = next(c for c in self.trainer.callbacks if isinstance(c, DifferentialNoiseInjection))
            seen.append((self.model.conv2.weight.detach().clone(), noise.clean_weight("model.conv2").detach().clone()))
            return super().training_step(batch, batch_idx)

    seed_everything(0)
    model = Probe(lr=0.0)
    w0 = model.model.conv2.weight.detach().clone()
    train, val = loaders()
    t = trainer(max_epochs=1, callbacks=dnq_callbacks("w4a4", stats_every=3))
    t.fit(model, train, val)
    assert len(seen) == 8
    for noisy, clean in seen:
        assert (noisy - w0).abs().max() > 1e-3
        torch.testing.assert_close(clean, w0, rtol=0, atol=1e-6)
