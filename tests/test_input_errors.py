"""Bad inputs raise a named error (its type, and a message naming the parameter), across the entry points.

Each case must fail loudly and early; none may pass silently or fail deep inside torch.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flatq_lightning import (
    QuantErrorRecorder,
    QuantSpec,
    QuantTarget,
    compute_qparams,
    dnq_callbacks,
    fake_quantize,
    quantize_model,
    run_ptq,
)
from flatq_lightning.app import ptq_cli
from flatq_lightning.app.data.cifar import load_cifar_arrays
from flatq_lightning.quant.ops import dequantize_int, quantize_int

# -- the quantization core -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_fake_quantize_refuses_integer_tensors(dtype):
    x = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor.*" + str(dtype).replace(".", r"\.")):
        fake_quantize(x, QuantSpec.weight(4), torch.ones(2))


def test_compute_qparams_refuses_integer_tensors():
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        compute_qparams(torch.arange(6).reshape(2, 3), QuantSpec.weight(4))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_fake_quantize_refuses_a_scale_not_positive_and_finite(bad):
    x = torch.randn(2, 3)
    scale = torch.tensor([0.1, bad])
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        fake_quantize(x, QuantSpec.weight(4), scale)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        quantize_int(x, QuantSpec.weight(4), scale)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        dequantize_int(torch.zeros(2, 3), QuantSpec.weight(4), scale)


def test_fake_quantize_scale_check_is_skippable_for_the_hot_path():
    # check_scale=False: the per-step callers (scales from qparams_from_range, > 0 by construction) skip it
    out = fake_quantize(torch.ones(1, 2), QuantSpec.weight(4), torch.tensor([0.0]), check_scale=False)
    assert out.shape == (1, 2)


@pytest.mark.parametrize("axis", [5, 7, -6, 100])
def test_quantspec_refuses_an_impossible_channel_axis(axis):
    with pytest.raises(ValueError, match=r"QuantSpec\.ch_axis must be an int in \[-5, 4\]"):
        QuantSpec(ch_axis=axis)


def test_channel_axis_beyond_the_tensor_is_named():
    spec = QuantSpec(bits=4, granularity="per_channel", ch_axis=3)
    with pytest.raises(ValueError, match=r"QuantSpec\.ch_axis=3 is out of range for a tensor of shape \(4, 5\)"):
        compute_qparams(torch.randn(4, 5), spec)


@pytest.mark.parametrize("spec", [QuantSpec.weight(4), QuantSpec.activation(4), QuantSpec.weight(4, observer="percentile")])
def test_compute_qparams_refuses_an_empty_tensor(spec):
    with pytest.raises(ValueError, match=r"empty tensor \(x has shape \(0, 3\)\)"):
        compute_qparams(torch.empty(0, 3), spec)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"percentile": "abc"}, "percentile"), ({"mse_grid": True}, "mse_grid"), ({"ch_axis": 1.5}, "ch_axis"),
     ({"bits": "4"}, "bits")],
)
def test_quantspec_wrong_types_are_named(kwargs, name):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{name} must be"):
        QuantSpec(**kwargs)


# -- untrusted files never execute code ----------------------------------------------------------------------


class _Exploit:
    """Unpickling this object would create ``marker`` (a stand-in for os.system & co)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cifar_batch(n: int) -> dict:
    return {b"data": np.zeros((n, 3 * 32 * 32), dtype=np.uint8), b"labels": list(range(n))}


def _torchvision_dir(root: Path, poison: str | None, marker: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {**_cifar_batch(2), b"x": _Exploit(marker)} if name == poison else _cifar_batch(2)
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    return d


def test_cifar_batch_reader_loads_plain_batches(tmp_path):
    d = _torchvision_dir(tmp_path, None, tmp_path / "marker")
    a = load_cifar_arrays(d, cache_dir="")
    assert a["x_train"].shape == (10, 32, 32, 3) and list(a["y_test"]) == [0, 1]


@pytest.mark.parametrize("poison", ["data_batch_3", "test_batch"])
def test_cifar_batch_reader_never_runs_code_from_a_crafted_file(tmp_path, poison):
    marker = tmp_path / "pwned"
    d = _torchvision_dir(tmp_path, poison, marker)
    with pytest.raises(ValueError, match=rf"{poison}: not a CIFAR batch file: refusing to load (io|builtins)\.open"):
        load_cifar_arrays(d, cache_dir="")
    assert not marker.exists()


def test_cifar_batch_reader_refuses_object_arrays(tmp_path):
    marker = tmp_path / "pwned"
    d = _torchvision_dir(tmp_path, None, marker)
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": np.array([_Exploit(marker)], dtype=object)}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR batch file"):
        load_cifar_arrays(d, cache_dir="")
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real flatq-train checkpoint (tiny synthetic job, DNQ + checkpoint callbacks)."""
    from flatq_lightning.app.train import run
    from tests.app.test_train import TINY, _compose

    out = tmp_path_factory.mktemp("ckpt")
    cfg = _compose([*TINY, "variants=null", "callbacks=[dnq,checkpoint]"])
    return Path(run(cfg, out)["variants"]["main"]["checkpoint"])


def _ptq(args: list[str], capsys) -> tuple[int, str]:
    rc = ptq_cli.main([*args, "--calib-batches", "1", "--no-progress", "--device", "cpu", "--bits", "w8a8"])
    return rc, capsys.readouterr().err


def test_flatq_ptq_loads_a_real_checkpoint_with_weights_only(tiny_checkpoint, tmp_path, capsys):
    rc, err = _ptq([str(tiny_checkpoint), "--save-dir", str(tmp_path / "rep")], capsys)
    assert rc == 0, err
    assert (tmp_path / "rep" / "ptq_report.json").is_file()


def test_flatq_ptq_never_runs_code_from_a_crafted_checkpoint(tiny_checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ck = torch.load(tiny_checkpoint, weights_only=True)
    ck["hyper_parameters"]["evil"] = _Exploit(marker)
    bad = tmp_path / "evil.ckpt"
    torch.save(ck, bad)
    rc, err = _ptq([str(bad), "--save-dir", str(tmp_path / "rep")], capsys)
    assert rc == 2 and not marker.exists()
    assert f"checkpoint {bad}: refusing to load it" in err and "never executes code" in err


def test_flatq_ptq_random_bytes_and_truncated_checkpoints(tiny_checkpoint, tmp_path, capsys):
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    trunc = tmp_path / "trunc.ckpt"
    data = tiny_checkpoint.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    for bad in (noise, trunc):
        rc, err = _ptq([str(bad), "--save-dir", str(tmp_path / "rep")], capsys)
        assert rc == 2 and f"checkpoint {bad}: not a readable PyTorch checkpoint" in err, err


def test_flatq_ptq_save_dir_that_is_a_file_fails_before_the_work(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import flatq_lightning.app.ptq_cli as cli

    f = tmp_path / "a_file"
    f.write_text("x")
    monkeypatch.setattr(cli, "_load_raw", lambda p: pytest.fail("loaded the checkpoint before checking --save-dir"))
    for sd, msg in ((f, "is a file, not a folder"), (f / "sub", "is a file, so the folder cannot be created")):
        rc, err = _ptq([str(tiny_checkpoint), "--save-dir", str(sd)], capsys)
        assert rc == 2 and f"--save-dir {sd}" in err and msg in err


def test_flatq_ptq_data_with_the_wrong_channel_count(tiny_checkpoint, tmp_path, capsys):
    rc, err = _ptq([str(tiny_checkpoint), "--data", "digits", "--save-dir", str(tmp_path / "rep")], capsys)
    assert rc == 2
    assert "--data digits: the data has 1-channel images but the checkpoint's network takes 3 input channels" in err


# -- data files: corrupt or non-image zip members ------------------------------------------------------------


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _zip(path: Path, bad_member: str, bad: bytes | None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "test"):
            for cls in ("cat", "dog"):
                name = f"c/{split}/{cls}/0.jpg"
                zf.writestr(name, bad if (name == bad_member and bad is not None) else _jpeg())
    return path


def test_zip_member_that_is_not_an_image_is_named(tmp_path):
    z = _zip(tmp_path / "d.zip", "c/train/dog/0.jpg", b"this is text, not a JPEG")
    with pytest.raises(ValueError, match=r"d\.zip:c/train/dog/0\.jpg: not a readable image"):
        load_cifar_arrays(z, cache_dir="")


def test_corrupt_zip_member_is_named(tmp_path):
    z = _zip(tmp_path / "d.zip", "c/test/cat/0.jpg", None)
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("c/test/cat/0.jpg")
    raw = bytearray(z.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + 5, start + 25):  # damage the compressed data of that member only
        raw[k] ^= 0xFF
    z.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"cannot read member 'c/test/cat/0\.jpg' \(corrupt archive\?"):
        load_cifar_arrays(z, cache_dir="")


# -- arguments that must name themselves ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"seed": "abc"}, TypeError, r"seed must be an int, got 'abc'"),
        ({"seed": 1.5}, TypeError, r"seed must be an int, got 1\.5"),
        ({"momentum": "abc"}, ValueError, r"momentum must be in \[0, 1\) \(a float\), got 'abc'"),
        ({"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\)"),
        ({"target": QuantTarget.preset("w4a16")}, ValueError, r"'w4a16': DNQ trains against a quantizer on both sides"),
        ({"target": 4}, ValueError, r"target must be a QuantTarget or a preset string like 'w4a4', got 4"),
        ({"noise_scale": float("nan")}, ValueError, r"noise_scale must be a finite float >= 0"),
        ({"act_noise_scale": float("inf")}, ValueError, r"noise_scale must be a finite float >= 0"),
    ],
)
def test_dnq_callbacks_name_the_bad_argument(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        dnq_callbacks(**{"target": "w4a4", **kwargs})


def test_recorder_flags_must_be_bools():
    for flag in ("record_activations", "log_sqnr", "check_finite"):
        with pytest.raises(TypeError, match=rf"{flag} must be True or False, got 'no'"):
            QuantErrorRecorder("w4a4", **{flag: "no"})


def _net():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_a_target_names_a_preset_string_given_as_a_spec():
    with pytest.raises(ValueError, match=r"QuantTarget.weight must be a QuantSpec or None \(float\), got 'w4a4'.*"
                                         r"QuantTarget\.preset"):
        QuantTarget(weight="w4a4")
    with pytest.raises(ValueError, match=r"QuantTarget.act must be a QuantSpec or None \(float\), got 4"):
        QuantTarget(weight=QuantSpec.weight(4), act=4)
    with pytest.raises(ValueError, match=r"QuantTarget.keep_first_last_8bit must be True or False, got 'no'"):
        QuantTarget(weight=QuantSpec.weight(4), keep_first_last_8bit="no")
    with pytest.raises(ValueError, match=r"quantize_model: target must be a QuantTarget or a preset string"):
        quantize_model(_net(), (QuantSpec.weight(4), None))


def test_run_ptq_target_must_be_a_target():
    data = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match=r"run_ptq: target must be a QuantTarget or None, got 'w8a8'"):
        run_ptq(_net(), data, data, bits="w8a8", calib_batches=1, target="w8a8", progress=False)


@pytest.mark.parametrize(
    "override,msg",
    [("trainer.max_epochs=abc", "trainer.max_epochs must be an integer (or null), got 'abc'"),
     ("+trainer.max_steps=1.5", "trainer.max_steps must be an integer (or null), got 1.5"),
     ("+trainer.limit_train_batches=lots", "trainer.limit_train_batches must be a number (or null), got 'lots'")],
)
def test_flatq_train_trainer_numbers_fail_before_fit(override, msg):
    from flatq_lightning.app.train import ConfigError, validate_config
    from tests.app.test_train import _compose

    with pytest.raises(ConfigError) as ei:
        validate_config(_compose([override]))
    assert str(ei.value) == msg


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"momentum": "abc"}, TypeError, r"momentum must be a finite number, got 'abc'"),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\), got 1\.5"),
        ({"lr": "fast"}, TypeError, r"lr must be a finite number, got 'fast'"),
        ({"weight_decay": float("nan")}, TypeError, r"weight_decay must be a finite number"),
        ({"nesterov": "no"}, TypeError, r"nesterov must be True or False, got 'no'"),
    ],
)
def test_image_classifier_names_the_bad_argument(kwargs, exc, msg):
    from flatq_lightning.app.module import ImageClassifier

    with pytest.raises(exc, match=msg):
        ImageClassifier("small_cnn", num_classes=3, **kwargs)


def test_flatq_train_seed_must_be_an_integer():
    from flatq_lightning.app.train import ConfigError, validate_config
    from tests.app.test_train import _compose

    with pytest.raises(ConfigError, match=r"^seed must be an integer, got 'abc'$"):
        validate_config(_compose(["seed=abc"]))


def test_schedules_refuse_non_finite_values():
    from flatq_lightning import Ramp
    from flatq_lightning.callbacks.schedules import PiecewiseLinear

    with pytest.raises(ValueError, match=r"Ramp end must be a finite float >= 0 \(a noise scale\), got nan"):
        Ramp(end=float("nan"))
    with pytest.raises(ValueError, match=r"Ramp start must be a finite float >= 0"):
        Ramp(start=float("inf"))
    with pytest.raises(ValueError, match=r"PiecewiseLinear values must be finite and >= 0"):
        PiecewiseLinear([(0, 0.0), (10, float("nan"))])
