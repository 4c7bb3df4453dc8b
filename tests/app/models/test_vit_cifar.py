"""The CIFAR ViT of the model factory."""

import pytest
import torch
from timm.layers import Attention

from flatq_lightning.app.models import LOCAL_MODELS, create_model


def test_vit_cifar_shape_and_attention():
    net = create_model("vit_cifar", num_classes=10, depth=1)
    assert "vit_cifar" in LOCAL_MODELS
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert net.patch_embed.num_patches == 64 and net.embed_dim == 192
    attn = [m for m in net.modules() if isinstance(m, Attention)]
    assert len(attn) == 1 and attn[0].num_heads == 3
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("vit_cifar", 10, pretrained=True)
