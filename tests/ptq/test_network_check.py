"""PTQ of a LightningModule whose ``model`` is only a part of the network warns."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import run_ptq
from flatq_lightning.app.module import ImageClassifier
from flatq_lightning.ptq.runner import check_ptq_network, ptq_network


class _BackboneOnly(pl.LightningModule):
    """``self.model`` is the backbone; the classifier head lives outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.model(x))


def _data(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=16)


def test_ptq_of_a_backbone_only_model_warns_naming_the_part():
    m = _BackboneOnly()
    m.train()
    with pytest.warns(UserWarning, match=r"run_ptq quantizes _BackboneOnly\.model \(Sequential\), but it is not the whole network: .*shape \(16, 8\), the module's \(16, 3\)"):
        run_ptq(m, _data(), _data(), bits="w8a8", calib_batches=1, progress=False)
    assert m.training and m.head.training  # modes restored


def test_same_shape_but_different_outputs_warns_too():
    class Scaled(_BackboneOnly):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

        def forward(self, x):
            return 2.0 * self.model(x) + 1.0

    m = Scaled()
    with pytest.warns(UserWarning, match=r"its output differs from the module's by up to"):
        assert check_ptq_network(m, ptq_network(m), _data()) is False


def test_an_image_classifier_does_not_warn():
    clf = ImageClassifier("small_cnn", num_classes=3, model_kwargs={"in_chans": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert check_ptq_network(clf, ptq_network(clf), _data()) is True
