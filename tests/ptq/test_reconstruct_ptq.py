"""run_ptq with the "reconstruct" recipe: equal to "practical" at 0 steps, exports carry the learned integers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import PTQRecipe, fold_batchnorm, load_quantized, quantize_model, run_ptq, save_quantized
from flatq_lightning.ptq.recipe import RECIPES, resolve_recipe
from flatq_lightning.quant import QuantTarget, Reconstruction, quantized_layers, reconstruct
from flatq_lightning.quant.ops import quantize_int
from tests.helpers import SmallConvNet, blob_data, train_small


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y = blob_data(256)
    net = train_small(SmallConvNet(), x, y, steps=120)
    return net.eval(), x, y


def _loader(x, y, bs=32):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def _ptq(net, x, y, recipe, **kw):
    return run_ptq(net, _loader(x, y), _loader(x, y, 64), bits=("w2a4", "w3a3"), calib_batches=4, recipe=recipe,
                   progress=False, **kw)


def test_zero_steps_without_drop_equal_the_practical_recipe_bit_for_bit(trained, tmp_path):
    net, x, y = trained
    zero = PTQRecipe.preset("reconstruct", iters=0, drop_prob=0.0, calib_images=256)
    a = _ptq(net, x, y, "practical", export_dir=tmp_path / "a")
    b = _ptq(net, x, y, zero, export_dir=tmp_path / "b")
    for ra, rb in zip(a.rows, b.rows):
        assert (ra.top1, ra.top5) == (rb.top1, rb.top5)
        assert [(la.weight_sqnr_db, la.act_sqnr_db) for la in ra.layers] == [(lb.weight_sqnr_db, lb.act_sqnr_db) for lb in rb.layers]
        fa = load_quantized(SmallConvNet(), ra.exports[0]["path"]).state_dict()
        fb = load_quantized(SmallConvNet(), rb.exports[0]["path"]).state_dict()
        assert all(torch.equal(fa[k], fb[k]) for k in fa)
        assert rb.recipe == "reconstruct" and ra.recipe == "practical"
        assert len(rb.reconstruction) == 4 and all(blk["loss"] == blk["loss_rtn"] for blk in rb.reconstruction)


def test_reconstruction_beats_practical_at_two_bits_and_says_so_in_the_report(trained):
    net, x, y = trained
    rec = PTQRecipe.preset("reconstruct", iters=150, calib_images=256)
    p = _ptq(net, x, y, "practical")
    r = _ptq(net, x, y, rec)
    assert r.recipe["name"] == "reconstruct" and r.recipe["reconstruction"]["iters"] == 150
    blocks = r.row("w2a4").reconstruction
    assert [b["name"] for b in blocks] == ["conv1", "conv2", "conv3", "fc"]
    assert sum(b["loss"] for b in blocks) < sum(b["loss_rtn"] for b in blocks)
    assert r.row("w2a4").top1 >= p.row("w2a4").top1
    m = r.metrics()
    assert m["ptq/w2a4/recon/conv2/loss"] == blocks[1]["loss"] and "ptq/w3a3/recon/fc/seconds" in m
    assert r.settings()["ptq/recipe"] == "reconstruct" and r.settings()["ptq/reconstruction/iters"] == 150
    md = r.markdown()
    assert "## Block reconstruction" in md and "Recipe reconstruct: weights mse, activations percentile" in md
    again = type(r).from_json(r.to_json())
    assert again.row("w2a4").reconstruction == blocks and again.recipe == r.recipe


def test_exports_carry_the_learned_integers_not_round_to_nearest(trained, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from flatq_lightning.ptq.onnx_export import check_onnx_parity, export_onnx

    net, x, y = trained
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    t = QuantTarget.preset("w3a8", "mse", "percentile")
    rtn = quantize_model(folded, t, calib_batches=[x[:128]])
    q = quantize_model(folded, t, calib_batches=[x[:128]])
    reconstruct(q, folded, folded, x, Reconstruction(iters=150, calib_images=256))
    codes = {n: quantize_int(m.module.weight.detach(), m.weight_spec, m.weight_scale) for n, m in quantized_layers(q)}
    rtn_codes = {n: quantize_int(m.module.weight.detach(), m.weight_spec, m.weight_scale) for n, m in quantized_layers(rtn)}
    assert any(not torch.equal(codes[n], rtn_codes[n]) for n in codes)  # else the test could not tell them apart

    r = load_quantized(SmallConvNet(), save_quantized(q, tmp_path / "q.safetensors", folded_bn_pairs=pairs))
    for n, m in quantized_layers(r):
        assert torch.equal(quantize_int(m.module.weight.detach(), m.weight_spec, m.weight_scale), codes[n])
        assert torch.equal(m.act_scale, q.get_submodule(n).act_scale)  # the learned step sizes too
    with torch.no_grad():
        assert torch.equal(r(x), q(x))

    path = export_onnx(q, tmp_path / "q.onnx", x[:1])
    import onnx

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for n in codes:
        stored = torch.from_numpy(init[f"{n}.weight_quantized"].astype("float32"))
        stored = stored.T if stored.shape != codes[n].shape else stored  # a Linear's weight goes in as (in, out)
        assert torch.equal(stored, codes[n]), n
    parity = check_onnx_parity(q, path, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)])
    assert abs(parity.top1_flatq - parity.top1_ort) <= 0.1 and parity.agreement >= 99.0


def test_reconstruction_draws_its_images_from_the_same_calibration_pass(trained):
    net, x, y = trained
    rec = PTQRecipe.preset("reconstruct", iters=1, calib_images=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4 calibration batches of 32 + the next ones of the same pass: no warning
        rep = run_ptq(net, _loader(x, y), _loader(x, y, 64), bits=("w4a4",), calib_batches=4, recipe=rec, progress=False)
    assert rep.calib_batches == 4
    with pytest.warns(UserWarning, match="reconstruction asked for 1000 calibration images, the calibration loader has 256"):
        run_ptq(net, _loader(x, y), _loader(x, y, 64), bits=("w4a4",), calib_batches=4, progress=False,
                recipe=rec.replace(calib_images=1000))


def test_the_old_keyword_arguments_warn_and_mean_the_same_recipe(trained):
    net, x, y = trained
    with pytest.warns(FutureWarning, match="deprecated"):
        old = _ptq(net, x, y, None, observer="mse", act_observer="percentile", bn_reestimate=True)
    new = _ptq(net, x, y, "practical")
    assert [r.top1 for r in old.rows] == [r.top1 for r in new.rows]
    assert old.recipe["name"] == "custom" and old.recipe["observer"] == "mse"


def test_recipe_values_and_their_errors():
    assert list(RECIPES) == ["minmax", "practical", "reconstruct"]
    assert RECIPES["practical"].reconstruction is None and RECIPES["reconstruct"].reconstruction == Reconstruction()
    r = resolve_recipe({"name": "practical", "iters": 10})
    assert r.reconstruction.iters == 10 and r.observer == "mse"
    assert resolve_recipe({"name": "reconstruct", "reconstruction": None}).reconstruction is None
    with pytest.raises(ValueError, match="unknown PTQ recipe 'fast'"):
        PTQRecipe.preset("fast")
    with pytest.raises(ValueError, match=r"unknown PTQ recipe setting\(s\) \['iterations'\]"):
        PTQRecipe.preset("reconstruct", iterations=5)
    with pytest.raises(ValueError, match="drop_prob must be in"):
        PTQRecipe.preset("reconstruct", drop_prob=2)
    with pytest.raises(ValueError, match="observer must be one of"):
        PTQRecipe(observer="max")
    with pytest.raises(ValueError, match="unknown PTQ recipe 'practcal'"):
        resolve_recipe({"name": "practcal"})
    assert resolve_recipe({"name": "mine", "observer": "mse"}) == PTQRecipe("mine", observer="mse")
    with pytest.raises(ValueError, match="recipe must be a PTQRecipe"):
        resolve_recipe(3)
