from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flatq_lightning.app.data import (
    CIFAR_STATS,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataNotFoundError,
    build_datamodule,
    cifar_io,
    load_cifar_arrays,
    random_crop_flip,
)
from tests.helpers import SUBPROCESS_TIMEOUT_S

from .conftest import CLASSES, N_TEST, N_TRAIN, _image

REAL_ZIP = Path(__file__).resolve().parents[4] / "shared" / "data" / "cifar10-jpeg.zip"


def test_zip_layout_decodes_with_imagefolder_class_order(tiny_cifar_zip, tmp_path):
    a = load_cifar_arrays(tiny_cifar_zip, cache_dir=tmp_path)
    assert list(a["classes"]) == sorted(CLASSES)
    assert a["x_train"].shape == (10 * N_TRAIN, 32, 32, 3) and a["x_train"].dtype == np.uint8
    assert a["x_test"].shape == (10 * N_TEST, 32, 32, 3)
    assert np.bincount(a["y_train"]).tolist() == [N_TRAIN] * 10
    # image i of class "cat" (index 3 in sorted order) is flat colour _image(3, i), JPEG within a few levels
    first_cat = int(np.flatnonzero(a["y_train"] == CLASSES.index("cat"))[0])
    diff = np.abs(a["x_train"][first_cat].astype(int) - _image(CLASSES.index("cat"), 0).astype(int))
    assert diff.max() <= 4


def test_decoded_once_then_read_from_cache(tiny_cifar_zip, tmp_path, monkeypatch):
    a = load_cifar_arrays(tiny_cifar_zip, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("cifar10-zip-*.npz"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(cifar_io, "_read_zip", boom)
    b = load_cifar_arrays(tiny_cifar_zip, cache_dir=tmp_path)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(a[k], b[k])


def test_folder_and_zip_give_the_same_arrays(tiny_cifar_zip, tiny_cifar_folder, tmp_path):
    a = load_cifar_arrays(tiny_cifar_zip, cache_dir=tmp_path / "a")
    for src in (tiny_cifar_folder, tiny_cifar_folder.parent):  # the folder or its parent
        b = load_cifar_arrays(src, cache_dir=tmp_path / "b")
        for k in ("x_train", "y_train", "x_test", "y_test", "classes"):
            assert np.array_equal(a[k], b[k]), k


def test_torchvision_pickle_folder(tiny_cifar_torchvision, tmp_path):
    a = load_cifar_arrays(tiny_cifar_torchvision, cache_dir="")  # "" disables the cache
    assert a["x_train"].shape == (50, 32, 32, 3) and a["x_test"].shape == (5, 32, 32, 3)
    assert list(a["classes"]) == CLASSES
    assert not list(tmp_path.iterdir())
    # channel-first rows → HWC: pixel (0, 0) takes bytes 0, 1024, 2048
    import pickle

    raw = pickle.loads((tiny_cifar_torchvision / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert a["x_train"][0, 0, 0].tolist() == [
        raw[b"data"][0, 0],
        raw[b"data"][0, 1024],
        raw[b"data"][0, 2048],
    ]


def test_missing_path_names_the_key_and_the_path(tmp_path):
    missing = tmp_path / "nope.zip"
    dm = CIFAR10DataModule(missing, cache_dir=tmp_path)
    with pytest.raises(DataNotFoundError) as ei:
        dm.prepare_data()
    assert "data.path" in str(ei.value) and str(missing) in str(ei.value)
    with pytest.raises(DataNotFoundError, match="data.path is not set"):
        load_cifar_arrays(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no cifar10 data layout"):
        load_cifar_arrays(tmp_path / "empty", cache_dir="")


def test_wrong_number_of_classes(tiny_cifar_zip, tmp_path):
    with pytest.raises(ValueError, match="expected 100 classes"):
        CIFAR100DataModule(tiny_cifar_zip, cache_dir=tmp_path).setup("fit")


def test_datamodule_subsets_are_seeded_and_normalised(tiny_cifar_zip, tmp_path):
    def make(seed):
        dm = CIFAR10DataModule(
            tiny_cifar_zip, cache_dir=tmp_path, batch_size=8, train_subset=12, test_subset=6, seed=seed
        )
        dm.setup("fit")
        return dm

    dm = make(0)
    assert len(dm.train_dataset) == 12 and len(dm.test_dataset) == 6 and dm.val_dataset is dm.test_dataset
    assert torch.equal(make(0).train_dataset.labels, dm.train_dataset.labels)
    assert not torch.equal(make(1).train_dataset.images, dm.train_dataset.images)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    # normalisation: raw uint8 → (x/255 - mean)/std
    raw = dm.train_dataset.images[0].permute(2, 0, 1).float() / 255
    mean, std = (torch.tensor(v).reshape(3, 1, 1) for v in CIFAR_STATS["cifar10"])
    torch.testing.assert_close(dm.train_dataset[0][0], (raw - mean) / std)
    assert dm.num_classes == 10 and dm.classes == sorted(CLASSES)


def test_val_size_holds_out_training_images(tiny_cifar_zip, tmp_path):
    dm = CIFAR10DataModule(tiny_cifar_zip, cache_dir=tmp_path, val_size=10)
    dm.setup("fit")
    assert len(dm.val_dataset) == 10 and len(dm.train_dataset) == 10 * N_TRAIN - 10
    assert dm.val_dataset is not dm.test_dataset


def test_augmentation_only_while_training(tiny_cifar_zip, tmp_path):
    dm = CIFAR10DataModule(tiny_cifar_zip, cache_dir=tmp_path, batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer((x, y), 0)[0] is x
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    xa, ya = dm.on_after_batch_transfer((x, y), 0)
    assert xa.shape == x.shape and ya is y and not torch.equal(xa, x)


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 6, 6)
    fill = [-1.0, -2.0, -3.0]
    out = random_crop_flip(x, padding=2, flip=True, fill=fill)
    padded = torch.tensor(fill).reshape(1, 3, 1, 1).expand(16, 3, 10, 10).clone()
    padded[:, :, 2:8, 2:8] = x
    for i in range(16):
        crops = [
            c
            for oy in range(5)
            for ox in range(5)
            for c in (padded[i, :, oy : oy + 6, ox : ox + 6], padded[i, :, oy : oy + 6, ox : ox + 6].flip(2))
        ]
        assert any(torch.equal(out[i], c) for c in crops), i
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


def test_build_datamodule_by_name(tiny_cifar_zip, tmp_path):
    dm = build_datamodule("cifar10", path=str(tiny_cifar_zip), cache_dir=str(tmp_path))
    assert isinstance(dm, CIFAR10DataModule)
    with pytest.raises(ValueError, match="choose one of"):
        build_datamodule("mnist")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ZIP.exists(), reason=f"{REAL_ZIP} is not present")
def test_real_cifar10_zip_subset():
    # decodes the 60,000 JPEGs once (~20 s on one core) into the default cache, then reads the cache
    a = load_cifar_arrays(REAL_ZIP)
    assert a["x_train"].shape == (50_000, 32, 32, 3) and a["x_test"].shape == (10_000, 32, 32, 3)
    assert np.bincount(a["y_train"]).tolist() == [5000] * 10
    mean = a["x_train"].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(mean, [125.27, 122.93, 113.86], atol=0.05)  # data/README.md
    dm = CIFAR10DataModule(REAL_ZIP, train_subset=10_000, test_subset=1_000, batch_size=256)
    dm.setup("fit")
    assert len(dm.train_dataset) == 10_000 and len(dm.test_dataset) == 1_000
    counts = np.bincount(dm.train_dataset.labels.numpy(), minlength=10)
    assert counts.min() > 900  # a random subset is roughly balanced
    x, _ = next(iter(dm.train_dataloader()))
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2


def _flatq_train(args: list[str], cwd: Path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(repo)}
    return subprocess.run(
        [sys.executable, "-m", "flatq_lightning.app.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tiny_zip", "real_zip"])
def test_cifar_experiment_end_to_end_on_a_zip(source, tiny_cifar_zip, tmp_path):
    # flatq-train as a user runs it (CLI, default CSV logger, checkpoints) on the JPEG zip: a tiny generated
    # one (decoded into a temporary cache), and the real one when present (a 64-image subset, default cache)
    if source == "real_zip":
        if not REAL_ZIP.exists():
            pytest.skip(f"{REAL_ZIP} is not present")
        data = [f"data.path={REAL_ZIP}", "data.train_subset=64", "data.test_subset=32"]
    else:
        data = [f"data.path={tiny_cifar_zip}", f"data.cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "run"
    r = _flatq_train(
        ["experiment=cifar10_resnet20_dnq", "trainer=cpu", "trainer.max_epochs=1", *data,
         "data.batch_size=16", "data.eval_batch_size=16", "data.num_workers=0", "ptq.bits=[w4a4]",
         "ptq.calib_batches=1", "torch_threads=1", f"hydra.run.dir={out}"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    main = json.loads((out / "results.json").read_text())["variants"]["main"]
    assert set(main["ptq"]) == {"w4a4"} and 0.0 <= main["fp_top1"] <= 100.0
    assert Path(main["checkpoint"]).is_file() and list(out.rglob("metrics.csv"))
