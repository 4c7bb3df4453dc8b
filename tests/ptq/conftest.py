"""The trained network the run_ptq and callback tests quantize (one per module)."""

import pytest
import torch

from tests.helpers import SmallConvNet, blob_data, train_small


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y = blob_data(512, seed=0)
    net = train_small(SmallConvNet(), x, y, steps=60)
    xe, ye = blob_data(256, seed=1)
    return net, (x, y), (xe, ye)
