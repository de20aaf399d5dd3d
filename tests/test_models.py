"""Model registry: shapes for every dataset geometry, seeded init, pooling equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedistill.data import dataset_info
from fedistill.models import MODELS, build_model, reinitialize
from fedistill.models.convnet import AvgPool2x2
from fedistill.registry import UnknownNameError


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("dataset", ["digits", "fashion_mnist", "cifar10"])
def test_models_forward_every_geometry(name, dataset):
    info = dataset_info(dataset)
    kwargs = {"width": 8} if name in ("convnet", "resnet18") else {}
    model = build_model(name, info, seed=0, **kwargs)
    x = torch.randn(3, *info.shape)
    assert model(x).shape == (3, info.num_classes)
    assert model.embed(x).shape == (3, model.feature_dim)


def test_convnet_pads_28x28_to_32x32_and_supports_norms():
    info = dataset_info("fashion_mnist")
    net = build_model("convnet", info, width=16)
    assert net.feature_dim == 16 * 4 * 4  # 32 -> 16 -> 8 -> 4
    assert build_model("convnet", dataset_info("digits"), width=16).feature_dim == 16  # 8 -> 4 -> 2 -> 1
    for norm in ("instance", "batch", "none"):
        assert build_model("convnet", info, width=4, norm=norm)(torch.randn(2, 1, 28, 28)).isfinite().all()
    assert isinstance(build_model("convnet", info, width=4).features[1], nn.GroupNorm)
    with pytest.raises(ValueError, match="unknown norm"):
        build_model("convnet", info, norm="layer")


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (32, 32)])
def test_avgpool2x2_matches_torch(size):
    x = torch.randn(2, 3, *size, requires_grad=True)
    assert torch.allclose(AvgPool2x2()(x), nn.AvgPool2d(2, 2)(x), atol=1e-6)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    info = dataset_info("digits")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model("convnet", info, seed=7, width=8)
    assert torch.equal(torch.get_rng_state(), state)
    b = reinitialize(build_model("convnet", info, width=8), 7)
    c = build_model("convnet", info, seed=8, width=8)
    for (_, pa), (_, pb), _ in zip(a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_unknown_model_and_bad_option():
    with pytest.raises(UnknownNameError, match="convnet"):
        build_model("vit", dataset_info("digits"))
    with pytest.raises(TypeError, match="bad options"):
        build_model("mlp", dataset_info("digits"), depth=3)


def test_reinitialize_draws_on_a_cpu_twin_and_never_reseeds_cuda(monkeypatch):
    """A model off the CPU gets the CPU init of the same seed (twin path forced here), CUDA is not reseeded."""
    from fedistill.models.registry import _cpu_twin

    def no_cuda_seed(seed):
        raise AssertionError("reinitialize reseeded the CUDA generators")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", no_cuda_seed)
    info = dataset_info("digits")
    fresh = build_model("convnet", info, seed=5, width=8)
    net = build_model("convnet", info, seed=6, width=8)
    originals = [p for p in net.parameters()]
    with torch.random.fork_rng(devices=[]), _cpu_twin(net, everything=True):
        assert all(p is not q for p, q in zip(net.parameters(), originals, strict=True))  # swapped for twins
        torch.default_generator.manual_seed(5)
        for m in net.modules():
            if m is not net and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    assert all(p is q for p, q in zip(net.parameters(), originals, strict=True))  # originals back, written in place
    for (_, a), (_, b) in zip(fresh.state_dict().items(), net.state_dict().items(), strict=True):
        assert torch.equal(a, b)
    again = reinitialize(build_model("convnet", info, width=8), 5)
    for (_, a), (_, b) in zip(fresh.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b)
