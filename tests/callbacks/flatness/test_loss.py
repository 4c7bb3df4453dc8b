"""The loss convention of the flatness measures: classification_loss and the checks every measure makes."""

from __future__ import annotations

import pytest
import torch

from flatq_lightning.callbacks.flatness import classification_loss, hessian_trace, loss_landscape_1d
from tests.callbacks.flatness.helpers import conv_setup


def test_classification_loss_takes_tuples_and_dicts():
    model, batches = conv_setup()
    x, y = batches[0]
    ref = classification_loss(model, (x, y))
    assert ref.shape == ()
    assert torch.equal(classification_loss(model, (x, y, "extra")), ref)
    assert torch.equal(classification_loss(model, {"image": x, "label": y}), ref)


def test_argument_errors():
    model, batches = conv_setup()
    with pytest.raises(ValueError, match="batches is empty"):
        hessian_trace(model, classification_loss, [])
    with pytest.raises(TypeError, match="list of batches"):
        hessian_trace(model, classification_loss, batches[0][0])
    with pytest.raises(ValueError, match="scalar Tensor"):
        hessian_trace(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(ValueError, match="batches is empty"):
        loss_landscape_1d(model, classification_loss, [])
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_trace(model, classification_loss, batches, params=[torch.zeros(2)])
    with pytest.raises(ValueError, match="inputs, targets"):
        classification_loss(model, batches[0][0])
