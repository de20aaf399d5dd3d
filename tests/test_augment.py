"""DSA: siamese parameters, group semantics, gradients, determinism."""

from __future__ import annotations

import pytest
import torch

from fedistill.augment import DSA, DSAConfig

OPS = ["color", "crop", "cutout", "flip", "scale", "rotate"]


@pytest.mark.parametrize("op", OPS)
def test_same_params_applied_to_real_and_synthetic(op):
    dsa = DSA()
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 3, 16, 16)
    real = torch.cat([img, torch.randn(5, 3, 16, 16)])  # a bigger "real" batch, groups 0,1,2 first
    real_groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    syn_groups = torch.tensor([0, 1, 2])
    params = dsa.sample(3, g, image_size=(16, 16), op=op)
    out_real = dsa.apply(real, params, real_groups)
    out_syn = dsa.apply(img.clone(), params, syn_groups)
    assert torch.allclose(out_real[:3], out_syn, atol=1e-6)


@pytest.mark.parametrize("op", ["scale", "rotate", "color", "crop", "cutout"])
def test_groups_get_different_transforms(op):
    dsa = DSA()
    x = torch.randn(1, 3, 16, 16).expand(8, 3, 16, 16).contiguous()
    out = dsa.apply(x, dsa.sample(8, torch.Generator().manual_seed(1), image_size=(16, 16), op=op))
    assert not all(torch.allclose(out[0], out[i]) for i in range(1, 8))


@pytest.mark.parametrize("op", OPS)
def test_gradients_flow_to_synthetic_images(op):
    dsa = DSA()
    syn = torch.randn(4, 1, 8, 8, requires_grad=True)
    out = dsa.apply(syn, dsa.sample(4, torch.Generator().manual_seed(2), image_size=(8, 8), op=op))
    (out * torch.randn_like(out)).sum().backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0


def test_no_flip_for_digits_and_determinism():
    assert "flip" not in DSA(DSAConfig(flip=False)).ops
    assert "flip" in DSA().ops
    x = torch.randn(6, 1, 8, 8)
    a = DSA()(x, torch.Generator().manual_seed(5))
    b = DSA()(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="unknown DSA ops"):
        DSA(DSAConfig(ops=("color", "warp")))


def test_op_per_group_is_siamese_and_differentiable():
    dsa = DSA()
    params = dsa.sample(4, torch.Generator().manual_seed(3), image_size=(8, 8), op_per_group=True)
    assert params.op == "mixed" and len(set(params.values["op_index"].tolist())) > 1
    syn = torch.randn(4, 1, 8, 8, requires_grad=True)
    real = torch.cat([syn.detach(), torch.randn(4, 1, 8, 8)])
    groups = torch.arange(4)
    out = dsa.apply(syn, params, groups)
    assert torch.allclose(dsa.apply(real, params, torch.cat([groups, groups]))[:4], out, atol=1e-6)
    out.sum().backward()
    assert syn.grad.abs().sum() > 0
